//! Typed wrapper over the loaded XDP object: the only place that knows map layouts on the
//! userspace side. Write order keeps a mapping whole at every instant: the reverse (private ->
//! public) entry goes in before the forward one, and comes out after it.
use std::{collections::BTreeMap, ffi::CString};

use aya::{
    Ebpf,
    maps::{DevMapHash, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{ProgramError, Xdp, XdpMode, links::LinkError, xdp::XdpLinkId},
};
use nat_common::{
    Counter, IfaceConfig, MAP_DEVMAP, MAP_IFACES, MAP_NAT_IN, MAP_NAT_OUT, MAP_STATS, NatEntry,
    ROLE_GUEST, ROLE_PUBLIC, Reason,
};
use serde::{Deserialize, Serialize};

use crate::state::Mapping;

/// Name of the XDP program in the object.
pub const PROGRAM: &str = "nat";

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("cannot load the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the XDP object has no map {0}")]
    MissingMap(&'static str),
    #[error("map {map}: {source}")]
    DevMap {
        map: &'static str,
        #[source]
        source: aya::maps::xdp::XdpMapError,
    },
    #[error("the XDP object has no program {PROGRAM}")]
    MissingProgram,
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot load the XDP program into the kernel: {0}")]
    Program(#[source] ProgramError),
    #[error("interface {0} does not exist")]
    UnknownIface(String),
    #[error(
        "cannot attach XDP to {iface} in native mode: {source}; if its driver has no native XDP \
         support, run natd with --xdp-mode generic"
    )]
    AttachNative {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("cannot attach XDP to {iface} in generic mode: {source}")]
    AttachGeneric {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("cannot detach XDP from {iface}: {source}")]
    Detach {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("cannot count possible CPUs ({0}): {1}")]
    Cpus(&'static str, std::io::Error),
    #[error("link: {0}")]
    Link(#[from] LinkError),
}

/// XDP attach mode, as the operator names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// In the driver (default): the fast path proper.
    Native,
    /// In the kernel's generic hook, for drivers without native XDP: much slower.
    Generic,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Native => "native",
            Mode::Generic => "generic",
        })
    }
}

/// Role of an interface, as the operator names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Public,
    Guest,
}

impl Role {
    const fn raw(self) -> u32 {
        match self {
            Role::Public => ROLE_PUBLIC,
            Role::Guest => ROLE_GUEST,
        }
    }
}

/// An interface the program is attached to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    pub name: String,
    pub ifindex: u32,
    pub role: Role,
    pub mode: Mode,
}

/// Frames and bytes a mapping translated, per direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingCounters {
    pub inbound_packets: u64,
    pub inbound_bytes: u64,
    pub outbound_packets: u64,
    pub outbound_bytes: u64,
}

/// Writes mappings into the fast path. A trait so the reconciler can be tested without BPF.
pub trait FastPath {
    fn insert(&mut self, m: Mapping) -> Result<(), DataplaneError>;
    fn remove(&mut self, m: Mapping) -> Result<(), DataplaneError>;
}

/// The loaded XDP object and the interfaces it is attached to.
pub struct Dataplane {
    ebpf: Ebpf,
    nr_cpus: usize,
    attached: Vec<(Attached, XdpLinkId)>,
}

pub fn ifindex(name: &str) -> Result<u32, DataplaneError> {
    let c = CString::new(name).map_err(|_| DataplaneError::UnknownIface(name.to_string()))?;
    // SAFETY: `c` is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(DataplaneError::UnknownIface(name.to_string())),
        i => Ok(i),
    }
}

fn key(addr: std::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

impl Dataplane {
    /// Loads the embedded object and its program into the kernel (nothing attached yet).
    pub fn load() -> Result<Self, DataplaneError> {
        Self::load_object(crate::EBPF_OBJECT)
    }

    pub fn load_object(object: &[u8]) -> Result<Self, DataplaneError> {
        let mut ebpf = Ebpf::load(object)?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or(DataplaneError::MissingProgram)?
            .try_into()
            .map_err(DataplaneError::Program)?;
        prog.load().map_err(DataplaneError::Program)?;
        let nr_cpus = aya::util::nr_cpus().map_err(|(what, e)| DataplaneError::Cpus(what, e))?;
        Ok(Self {
            ebpf,
            nr_cpus,
            attached: Vec::new(),
        })
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    fn map(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DataplaneError> {
        self.ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap(name))
    }

    fn nat_map(
        &mut self,
        name: &'static str,
    ) -> Result<PerCpuHashMap<&mut MapData, u32, NatEntry>, DataplaneError> {
        PerCpuHashMap::try_from(self.map(name)?)
            .map_err(|source| DataplaneError::Map { map: name, source })
    }

    /// Declares `name` with `role` (redirect target first, then role) and attaches the program.
    pub fn attach(
        &mut self,
        name: &str,
        role: Role,
        mode: Mode,
    ) -> Result<Attached, DataplaneError> {
        let ifindex = ifindex(name)?;
        let map_err = |map| move |source| DataplaneError::Map { map, source };
        DevMapHash::try_from(self.map(MAP_DEVMAP)?)
            .map_err(map_err(MAP_DEVMAP))?
            .insert(ifindex, ifindex, None, 0)
            .map_err(|source| DataplaneError::DevMap {
                map: MAP_DEVMAP,
                source,
            })?;
        HashMap::<_, u32, IfaceConfig>::try_from(self.map(MAP_IFACES)?)
            .map_err(map_err(MAP_IFACES))?
            .insert(
                ifindex,
                IfaceConfig {
                    role: role.raw(),
                    _pad: 0,
                },
                0,
            )
            .map_err(map_err(MAP_IFACES))?;
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM)
            .ok_or(DataplaneError::MissingProgram)?
            .try_into()
            .map_err(DataplaneError::Program)?;
        let link = match mode {
            Mode::Native => {
                prog.attach_to_if_index(ifindex, XdpMode::Driver)
                    .map_err(|source| DataplaneError::AttachNative {
                        iface: name.to_string(),
                        source,
                    })?
            }
            Mode::Generic => prog
                .attach_to_if_index(ifindex, XdpMode::Skb)
                .map_err(|source| DataplaneError::AttachGeneric {
                    iface: name.to_string(),
                    source,
                })?,
        };
        let a = Attached {
            name: name.to_string(),
            ifindex,
            role,
            mode,
        };
        self.attached.push((a.clone(), link));
        Ok(a)
    }

    pub fn attached(&self) -> impl Iterator<Item = &Attached> {
        self.attached.iter().map(|(a, _)| a)
    }

    /// Detaches from every interface (the object itself goes when `self` is dropped).
    pub fn detach_all(&mut self) -> Result<Vec<Attached>, DataplaneError> {
        let mut done = Vec::new();
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM)
            .ok_or(DataplaneError::MissingProgram)?
            .try_into()
            .map_err(DataplaneError::Program)?;
        for (a, link) in self.attached.drain(..) {
            prog.detach(link).map_err(|source| DataplaneError::Detach {
                iface: a.name.clone(),
                source,
            })?;
            done.push(a);
        }
        Ok(done)
    }

    /// Sums the per-CPU verdict counters.
    pub fn stats(&mut self) -> Result<BTreeMap<Reason, Counter>, DataplaneError> {
        let arr = PerCpuArray::<_, Counter>::try_from(self.map(MAP_STATS)?).map_err(|source| {
            DataplaneError::Map {
                map: MAP_STATS,
                source,
            }
        })?;
        let mut out = BTreeMap::new();
        for r in Reason::ALL {
            let v = arr
                .get(&(r as u32), 0)
                .map_err(|source| DataplaneError::Map {
                    map: MAP_STATS,
                    source,
                })?;
            let mut c = Counter::default();
            for cpu in v.iter() {
                c.packets += cpu.packets;
                c.bytes += cpu.bytes;
            }
            out.insert(r, c);
        }
        Ok(out)
    }

    /// Sums the per-CPU counters of one mapping (zero for a direction not installed).
    pub fn counters(&mut self, m: Mapping) -> Result<MappingCounters, DataplaneError> {
        let sum = |v: Result<PerCpuValues<NatEntry>, MapError>, map| match v {
            Ok(v) => Ok(v
                .iter()
                .fold((0, 0), |(p, b), e| (p + e.packets, b + e.bytes))),
            Err(MapError::KeyNotFound) => Ok((0, 0)),
            Err(source) => Err(DataplaneError::Map { map, source }),
        };
        let (inbound_packets, inbound_bytes) =
            sum(self.nat_map(MAP_NAT_IN)?.get(&key(m.public), 0), MAP_NAT_IN)?;
        let (outbound_packets, outbound_bytes) = sum(
            self.nat_map(MAP_NAT_OUT)?.get(&key(m.private), 0),
            MAP_NAT_OUT,
        )?;
        Ok(MappingCounters {
            inbound_packets,
            inbound_bytes,
            outbound_packets,
            outbound_bytes,
        })
    }

    fn put(&mut self, map: &'static str, k: u32, addr: u32) -> Result<(), DataplaneError> {
        let values =
            PerCpuValues::try_from(vec![NatEntry::new(addr); self.nr_cpus]).map_err(|source| {
                DataplaneError::Map {
                    map,
                    source: MapError::IoError(source),
                }
            })?;
        self.nat_map(map)?
            .insert(k, values, 0)
            .map_err(|source| DataplaneError::Map { map, source })
    }

    fn delete(&mut self, map: &'static str, k: u32) -> Result<(), DataplaneError> {
        match self.nat_map(map)?.remove(&k) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DataplaneError::Map { map, source }),
        }
    }
}

impl FastPath for Dataplane {
    fn insert(&mut self, m: Mapping) -> Result<(), DataplaneError> {
        self.put(MAP_NAT_OUT, key(m.private), key(m.public))?;
        if let Err(e) = self.put(MAP_NAT_IN, key(m.public), key(m.private)) {
            // Leave nothing half-installed.
            let _ = self.delete(MAP_NAT_OUT, key(m.private));
            return Err(e);
        }
        Ok(())
    }

    fn remove(&mut self, m: Mapping) -> Result<(), DataplaneError> {
        self.delete(MAP_NAT_IN, key(m.public))?;
        self.delete(MAP_NAT_OUT, key(m.private))
    }
}
