//! Typed wrapper over the loaded XDP object: the only place that knows map layouts on the
//! userspace side. Write order keeps a mapping whole at every instant: the reverse (private ->
//! public) entry goes in before the forward one, and comes out after it.
use std::{
    collections::BTreeMap,
    ffi::CString,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::MapInfo,
    maps::{
        Array, DevMapHash, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuHashMap,
        PerCpuValues, lpm_trie::Key as LpmKey,
    },
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::SchedClassifierLinkId,
        xdp::{XdpLink, XdpLinkId},
    },
};
use nat_common::{
    ALL_MAPS, Counter, EG_SVC_BASE_BITS, EgSvcData, Event, FW_SRC_BASE_BITS, FW_SVC_BASE_BITS,
    FlowKey, FlowState, FwSrcData, FwSvcData, IfaceConfig, MAP_CONFIG, MAP_CONNTRACK, MAP_DEVMAP,
    MAP_EG_DST, MAP_EG_SVC, MAP_EVENTS, MAP_FW_SRC, MAP_FW_SVC, MAP_IFACES, MAP_NAT_IN,
    MAP_NAT_OUT, MAP_STATS, NatConfig, NatEntry, ROLE_GUEST, ROLE_PUBLIC, Reason, RuleBits,
};
use serde::{Deserialize, Serialize};

use crate::{
    cidr::Cidr,
    pins::PinDir,
    state::{DesiredState, Mapping},
    tables::{Entry, Op, Tables},
};

/// Name of the XDP program in the object.
pub const PROGRAM: &str = "nat";
/// Name of the tc egress learner (see nat-ebpf/src/learn.rs).
pub const LEARNER: &str = "learn";

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("cannot load the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the XDP object has no map {0}")]
    MissingMap(&'static str),
    #[error("the fast path's {map} table is full ({capacity} entries); nothing was changed")]
    Full { map: &'static str, capacity: u32 },
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
    #[error("cannot attach the tc learner to {iface}: {source}")]
    Learner {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("cannot replace the program attached to {iface}: {source}")]
    Replace {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("cannot pin {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("cannot remove pin {path}: {source}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot adopt pinned map {path}: {why}; stop the old natd with --detach-on-exit or \
         remove the pins to start afresh (connection tracking is then lost)"
    )]
    Adopt { path: PathBuf, why: String },
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
    /// The attachment was taken over from an earlier natd (its link updated in place).
    #[serde(default)]
    pub adopted: bool,
    /// How often natd attached again after the interface was deleted and created again.
    #[serde(default)]
    pub reattached: u64,
}

/// Frames and bytes a mapping translated, per direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingCounters {
    pub inbound_packets: u64,
    pub inbound_bytes: u64,
    /// Dropped by the public IP's ingress firewall.
    pub inbound_denied: u64,
    pub outbound_packets: u64,
    pub outbound_bytes: u64,
    /// Dropped by the egress policy.
    pub outbound_denied: u64,
}

/// Writes the fast path's maps, one [`Op`] at a time. A trait so the reconciler can be tested
/// without BPF.
pub trait FastPath {
    fn apply(&mut self, op: &Op) -> Result<(), DataplaneError>;
}

/// The loaded XDP object and the interfaces it is attached to.
pub struct Dataplane {
    ebpf: Ebpf,
    nr_cpus: usize,
    attached: Vec<(Attached, Held)>,
    pins: Option<PinDir>,
    /// Whether the maps existed before (adopted from an earlier natd).
    adopted: bool,
    /// The tc egress learner's attachments (tcx links, gone with natd: the learner only
    /// matters while natd runs, a new natd attaches it again).
    learners: Vec<(String, SchedClassifierLinkId)>,
}

/// How natd holds an interface's XDP attachment.
enum Held {
    /// Owned by the program object: detached when natd exits.
    Owned(XdpLinkId),
    /// A pinned bpf_link: stays attached when natd exits, until its pin is removed.
    Pinned(FdLink, PathBuf),
}

pub fn ifindex(name: &str) -> Result<u32, DataplaneError> {
    let c = CString::new(name).map_err(|_| DataplaneError::UnknownIface(name.to_string()))?;
    // SAFETY: `c` is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(DataplaneError::UnknownIface(name.to_string())),
        i => Ok(i),
    }
}

/// The first IPv4 address of interface `name`, if it has one.
pub fn iface_ipv4(name: &str) -> Option<std::net::Ipv4Addr> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` walks the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: non-null, NUL-terminated per getifaddrs(3).
        let ifname = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        // SAFETY: non-null sockaddr; the family says which struct it is.
        if ifname.to_bytes() == name.as_bytes()
            && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET
        {
            // SAFETY: AF_INET addresses are sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            found = Some(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            break;
        }
    }
    // SAFETY: `head` came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    found
}

/// A map write error, or [`DataplaneError::Full`] when the map has no room left (the kernel
/// answers E2BIG for hash maps, ENOSPC for LPM tries).
fn write_error(map: &'static str, source: MapError) -> DataplaneError {
    let full = match &source {
        MapError::SyscallError(e) => {
            matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC))
        }
        _ => false,
    };
    if full {
        let capacity = match map {
            MAP_NAT_IN | MAP_NAT_OUT => nat_common::MAX_MAPPINGS,
            MAP_FW_SRC => nat_common::MAX_FW_SRC,
            MAP_FW_SVC => nat_common::MAX_FW_SVC,
            _ => nat_common::MAX_EG,
        };
        return DataplaneError::Full { map, capacity };
    }
    DataplaneError::Map { map, source }
}

/// Key and value sizes of each map, as this natd's program declares them.
fn expected_layout(name: &str) -> Option<(usize, usize)> {
    use std::mem::size_of;
    let lpm = |data: usize| 4 + data;
    Some(match name {
        MAP_NAT_IN | MAP_NAT_OUT => (size_of::<u32>(), size_of::<NatEntry>()),
        MAP_IFACES => (size_of::<u32>(), size_of::<IfaceConfig>()),
        MAP_STATS => (size_of::<u32>(), size_of::<Counter>()),
        MAP_EVENTS => (size_of::<u32>(), size_of::<u64>()),
        MAP_FW_SRC => (lpm(size_of::<FwSrcData>()), size_of::<RuleBits>()),
        MAP_FW_SVC => (lpm(size_of::<FwSvcData>()), size_of::<RuleBits>()),
        MAP_EG_DST => (lpm(4), size_of::<RuleBits>()),
        MAP_EG_SVC => (lpm(size_of::<EgSvcData>()), size_of::<RuleBits>()),
        MAP_CONNTRACK => (size_of::<FlowKey>(), size_of::<FlowState>()),
        MAP_CONFIG => (size_of::<u32>(), size_of::<NatConfig>()),
        _ => return None,
    })
}

/// Checks that a pinned map left by an earlier natd has the layout this natd's program uses;
/// adopting one that does not would corrupt it.
fn check_pinned(name: &str, path: &Path) -> Result<(), DataplaneError> {
    let info = MapInfo::from_pin(path).map_err(|source| DataplaneError::Adopt {
        path: path.to_path_buf(),
        why: source.to_string(),
    })?;
    let found = (info.key_size() as usize, info.value_size() as usize);
    match expected_layout(name) {
        Some(want) if want != found => Err(DataplaneError::Adopt {
            path: path.to_path_buf(),
            why: format!(
                "key/value size {}/{} but this natd's program needs {}/{}",
                found.0, found.1, want.0, want.1
            ),
        }),
        _ => Ok(()),
    }
}

fn addr(raw: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(raw.to_ne_bytes())
}

fn key(addr: std::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

impl Dataplane {
    /// Loads the embedded object and its program into the kernel (nothing attached yet).
    pub fn load(conntrack_size: u32) -> Result<Self, DataplaneError> {
        Self::load_with(crate::EBPF_OBJECT, conntrack_size)
    }

    pub fn load_object(object: &[u8]) -> Result<Self, DataplaneError> {
        Self::load_with(object, nat_common::DEFAULT_CONNTRACK_SIZE)
    }

    /// Loads `object` with a connection table of `conntrack_size` entries.
    pub fn load_with(object: &[u8], conntrack_size: u32) -> Result<Self, DataplaneError> {
        Self::open(object, conntrack_size, None)
    }

    /// Loads `object`; with `pins`, every map is adopted from its pin if one exists (an earlier
    /// natd's state, connection table and counters) and pinned otherwise.
    pub fn open(
        object: &[u8],
        conntrack_size: u32,
        pins: Option<PinDir>,
    ) -> Result<Self, DataplaneError> {
        let mut loader = aya::EbpfLoader::new();
        loader.map_max_entries(MAP_CONNTRACK, conntrack_size);
        let mut adopted = false;
        if let Some(p) = &pins {
            for name in ALL_MAPS {
                let path = p.map(name);
                if path.exists() {
                    adopted = true;
                    check_pinned(name, &path)?;
                }
                loader.map_pin_path(name, path);
            }
        }
        let mut ebpf = loader.load(object)?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or(DataplaneError::MissingProgram)?
            .try_into()
            .map_err(DataplaneError::Program)?;
        prog.load().map_err(DataplaneError::Program)?;
        let learner: &mut SchedClassifier = ebpf
            .program_mut(LEARNER)
            .ok_or(DataplaneError::MissingProgram)?
            .try_into()
            .map_err(DataplaneError::Program)?;
        learner.load().map_err(DataplaneError::Program)?;
        let nr_cpus = aya::util::nr_cpus().map_err(|(what, e)| DataplaneError::Cpus(what, e))?;
        Ok(Self {
            ebpf,
            nr_cpus,
            attached: Vec::new(),
            learners: Vec::new(),
            pins,
            adopted,
        })
    }

    /// Whether the maps were adopted from pins left by an earlier natd.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    pub fn pins(&self) -> Option<&PinDir> {
        self.pins.as_ref()
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
                    addr: iface_ipv4(name).map_or(0, |a| u32::from_ne_bytes(a.octets())),
                },
                0,
            )
            .map_err(map_err(MAP_IFACES))?;
        let pin = self.pins.as_ref().map(|p| p.link(name));
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM)
            .ok_or(DataplaneError::MissingProgram)?
            .try_into()
            .map_err(DataplaneError::Program)?;
        // An earlier natd's link: swap our program in atomically (bpf_link_update), so the
        // interface never runs without one.
        if let Some(path) = pin.as_ref().filter(|p| p.exists()) {
            let link = PinnedLink::from_pin(path).map_err(DataplaneError::Link)?;
            let link = XdpLink::try_from(FdLink::from(link)).map_err(DataplaneError::Link)?;
            let id = prog
                .attach_to_link(link)
                .map_err(|source| DataplaneError::Replace {
                    iface: name.to_string(),
                    source,
                })?;
            let fd = FdLink::try_from(prog.take_link(id).map_err(DataplaneError::Program)?)
                .map_err(DataplaneError::Link)?;
            let a = Attached {
                name: name.to_string(),
                ifindex,
                role,
                mode,
                adopted: true,
                reattached: 0,
            };
            self.attached
                .push((a.clone(), Held::Pinned(fd, path.clone())));
            return Ok(a);
        }
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
        let held = match pin {
            Some(path) => {
                let fd = FdLink::try_from(prog.take_link(link).map_err(DataplaneError::Program)?)
                    .map_err(DataplaneError::Link)?;
                let pinned = fd.pin(&path).map_err(|source| DataplaneError::Pin {
                    path: path.clone(),
                    source,
                })?;
                Held::Pinned(FdLink::from(pinned), path)
            }
            None => Held::Owned(link),
        };
        let a = Attached {
            name: name.to_string(),
            ifindex,
            role,
            mode,
            adopted: false,
            reattached: 0,
        };
        self.attached.push((a.clone(), held));
        Ok(a)
    }

    pub fn attached(&self) -> impl Iterator<Item = &Attached> {
        self.attached.iter().map(|(a, _)| a)
    }

    /// Interfaces whose name now has another ifindex or none: deleted (and perhaps created
    /// again) since natd attached to them.
    pub fn stale(&self) -> Vec<(Attached, Option<u32>)> {
        self.attached
            .iter()
            .map(|(a, _)| (a.clone(), ifindex(&a.name).ok()))
            .filter(|(a, now)| *now != Some(a.ifindex))
            .collect()
    }

    /// Attaches again to `name`, which was deleted and created again: forgets the old
    /// ifindex and link (its pin too), declares the new one and attaches.
    pub fn reattach(&mut self, name: &str) -> Result<Attached, DataplaneError> {
        let Some(pos) = self.attached.iter().position(|(a, _)| a.name == name) else {
            return Err(DataplaneError::UnknownIface(name.to_string()));
        };
        let (old, held) = self.attached.remove(pos);
        match held {
            // The link died with the interface; only its pin remains.
            Held::Pinned(fd, path) => {
                let _ = std::fs::remove_file(&path);
                drop(fd);
            }
            Held::Owned(link) => {
                if let Ok(prog) = self.program() {
                    let _ = prog.detach(link);
                }
            }
        }
        if let Ok(mut m) = HashMap::<_, u32, IfaceConfig>::try_from(self.map(MAP_IFACES)?) {
            let _ = m.remove(&old.ifindex);
        }
        if let Ok(mut m) = DevMapHash::try_from(self.map(MAP_DEVMAP)?) {
            let _ = m.remove(old.ifindex);
        }
        let mut a = self.attach(name, old.role, old.mode)?;
        if let Err(e) = self.attach_learner(name) {
            log::warn!("{e}");
        }
        a.reattached = old.reattached + 1;
        if let Some((last, _)) = self.attached.last_mut() {
            last.reattached = a.reattached;
        }
        Ok(a)
    }

    /// Attaches the tc egress learner to `name` (after XDP), so flows the kernel forwards are
    /// known to the fast path.
    pub fn attach_learner(&mut self, name: &str) -> Result<(), DataplaneError> {
        if let Err(e) = aya::programs::tc::qdisc_add_clsact(name) {
            // Already there, or not needed with tcx (kernel >= 6.6).
            log::debug!("clsact on {name}: {e}");
        }
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(LEARNER)
            .ok_or(DataplaneError::MissingProgram)?
            .try_into()
            .map_err(DataplaneError::Program)?;
        let id =
            prog.attach(name, TcAttachType::Egress)
                .map_err(|source| DataplaneError::Learner {
                    iface: name.to_string(),
                    source,
                })?;
        self.learners.retain(|(n, _)| n != name);
        self.learners.push((name.to_string(), id));
        Ok(())
    }

    fn detach_learners(&mut self) {
        let Some(Ok(prog)) = self
            .ebpf
            .program_mut(LEARNER)
            .map(<&mut SchedClassifier>::try_from)
        else {
            return;
        };
        for (_, id) in self.learners.drain(..) {
            let _ = prog.detach(id);
        }
    }

    fn program(&mut self) -> Result<&mut Xdp, DataplaneError> {
        self.ebpf
            .program_mut(PROGRAM)
            .ok_or(DataplaneError::MissingProgram)?
            .try_into()
            .map_err(DataplaneError::Program)
    }

    /// Detaches from every interface (the object itself goes when `self` is dropped).
    pub fn detach_all(&mut self) -> Result<Vec<Attached>, DataplaneError> {
        self.detach_learners();
        let mut done = Vec::new();
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM)
            .ok_or(DataplaneError::MissingProgram)?
            .try_into()
            .map_err(DataplaneError::Program)?;
        for (a, held) in self.attached.drain(..) {
            match held {
                Held::Owned(link) => {
                    prog.detach(link).map_err(|source| DataplaneError::Detach {
                        iface: a.name.clone(),
                        source,
                    })?
                }
                // Without its pin, closing the last fd detaches the link.
                Held::Pinned(fd, path) => {
                    std::fs::remove_file(&path).map_err(|source| DataplaneError::Unpin {
                        path: path.clone(),
                        source,
                    })?;
                    drop(fd);
                }
            }
            done.push(a);
        }
        Ok(done)
    }

    /// Reads back what the maps hold: the mappings (repairing a half-written one left by a
    /// natd killed mid-change, which it removes) and every firewall entry, so a new natd can
    /// reconcile them with the desired state instead of starting from empty maps.
    pub fn installed(&mut self) -> Result<(DesiredState, Tables), DataplaneError> {
        let read = |dp: &mut Self, map| -> Result<BTreeMap<u32, u32>, DataplaneError> {
            let m = dp.nat_map(map)?;
            let mut out = BTreeMap::new();
            for kv in m.iter() {
                match kv {
                    Ok((k, v)) => {
                        if let Some(e) = v.first() {
                            out.insert(k, e.addr);
                        }
                    }
                    Err(MapError::KeyNotFound) => {}
                    Err(source) => return Err(DataplaneError::Map { map, source }),
                }
            }
            Ok(out)
        };
        let nat_in = read(self, MAP_NAT_IN)?;
        let nat_out = read(self, MAP_NAT_OUT)?;
        let mut state = DesiredState::default();
        for (&p, &v) in &nat_in {
            let m = Mapping {
                public: addr(p),
                private: addr(v),
            };
            if nat_out.get(&v) == Some(&p) && state.add_mapping(m).is_ok() {
                continue;
            }
            log::warn!(
                "removing half-installed mapping {} -> {}",
                m.public,
                m.private
            );
            self.delete(MAP_NAT_IN, p)?;
        }
        for (&v, &p) in &nat_out {
            if nat_in.get(&p) != Some(&v) {
                log::warn!("removing half-installed mapping {} -> {}", addr(p), addr(v));
                self.delete(MAP_NAT_OUT, v)?;
            }
        }
        let mut entries = std::collections::HashMap::new();
        for (k, b) in self.lpm_entries::<FwSrcData>(MAP_FW_SRC)? {
            let len = k.prefix_len().saturating_sub(FW_SRC_BASE_BITS) as u8;
            if let Some(c) = Cidr::new(k.data().source.into(), len) {
                entries.insert(Entry::FwSrc(k.data().public.into(), c), b);
            }
        }
        for (k, b) in self.lpm_entries::<FwSvcData>(MAP_FW_SVC)? {
            let d = k.data();
            let len = k.prefix_len().saturating_sub(FW_SVC_BASE_BITS) as u8;
            entries.insert(
                Entry::FwSvc(d.public.into(), d.proto, u16::from_be_bytes(d.service), len),
                b,
            );
        }
        for (k, b) in self.lpm_entries::<[u8; 4]>(MAP_EG_DST)? {
            if let Some(c) = Cidr::new(k.data().into(), k.prefix_len() as u8) {
                entries.insert(Entry::EgDst(c), b);
            }
        }
        for (k, b) in self.lpm_entries::<EgSvcData>(MAP_EG_SVC)? {
            let d = k.data();
            let e = match k.prefix_len() {
                0 => Entry::EgSvc(None, 0, 0),
                p => Entry::EgSvc(
                    Some(d.proto),
                    u16::from_be_bytes(d.service),
                    (p - EG_SVC_BASE_BITS) as u8,
                ),
            };
            entries.insert(e, b);
        }
        let egress_default_deny = self.config()?.egress_default_deny != 0;
        state.set_egress_default_allow(!egress_default_deny);
        Ok((
            state,
            Tables {
                entries,
                egress_default_deny,
            },
        ))
    }

    fn lpm_entries<K: aya::Pod>(
        &mut self,
        map: &'static str,
    ) -> Result<Vec<(LpmKey<K>, RuleBits)>, DataplaneError> {
        let t = self.lpm::<K>(map)?;
        let mut out = Vec::new();
        for kv in t.iter() {
            match kv {
                Ok(kv) => out.push(kv),
                Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(DataplaneError::Map { map, source }),
            }
        }
        Ok(out)
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
            Ok(v) => Ok(v.iter().fold((0, 0, 0), |(p, b, d), e| {
                (p + e.packets, b + e.bytes, d + e.denied)
            })),
            Err(MapError::KeyNotFound) => Ok((0, 0, 0)),
            Err(source) => Err(DataplaneError::Map { map, source }),
        };
        let inbound = self.nat_map(MAP_NAT_IN)?.get(&key(m.public), 0);
        let (inbound_packets, inbound_bytes, inbound_denied) = sum(inbound, MAP_NAT_IN)?;
        let outbound = self.nat_map(MAP_NAT_OUT)?.get(&key(m.private), 0);
        let (outbound_packets, outbound_bytes, outbound_denied) = sum(outbound, MAP_NAT_OUT)?;
        Ok(MappingCounters {
            inbound_packets,
            inbound_bytes,
            inbound_denied,
            outbound_packets,
            outbound_bytes,
            outbound_denied,
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
            .map_err(|source| write_error(map, source))
    }

    fn delete(&mut self, map: &'static str, k: u32) -> Result<(), DataplaneError> {
        match self.nat_map(map)?.remove(&k) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DataplaneError::Map { map, source }),
        }
    }
}

impl Dataplane {
    fn insert_mapping(&mut self, m: Mapping) -> Result<(), DataplaneError> {
        self.put(MAP_NAT_OUT, key(m.private), key(m.public))?;
        if let Err(e) = self.put(MAP_NAT_IN, key(m.public), key(m.private)) {
            // Leave nothing half-installed.
            let _ = self.delete(MAP_NAT_OUT, key(m.private));
            return Err(e);
        }
        Ok(())
    }

    fn remove_mapping(&mut self, m: Mapping) -> Result<(), DataplaneError> {
        self.delete(MAP_NAT_IN, key(m.public))?;
        self.delete(MAP_NAT_OUT, key(m.private))
    }

    fn lpm<K: aya::Pod>(
        &mut self,
        map: &'static str,
    ) -> Result<LpmTrie<&mut MapData, K, RuleBits>, DataplaneError> {
        LpmTrie::try_from(self.map(map)?).map_err(|source| DataplaneError::Map { map, source })
    }

    fn set_entry(&mut self, e: Entry, bits: Option<RuleBits>) -> Result<(), DataplaneError> {
        fn write<K: aya::Pod>(
            dp: &mut Dataplane,
            map: &'static str,
            k: LpmKey<K>,
            bits: Option<RuleBits>,
        ) -> Result<(), DataplaneError> {
            let mut t = dp.lpm::<K>(map)?;
            let r = match bits {
                Some(b) => t.insert(&k, b, 0),
                None => match t.remove(&k) {
                    Err(MapError::KeyNotFound) => Ok(()),
                    r => r,
                },
            };
            r.map_err(|source| write_error(map, source))
        }
        match e {
            Entry::FwSrc(public, cidr) => {
                let data = FwSrcData {
                    public: public.octets(),
                    source: cidr.addr().octets(),
                };
                let k = LpmKey::new(FW_SRC_BASE_BITS + u32::from(cidr.prefix_len()), data);
                write(self, MAP_FW_SRC, k, bits)
            }
            Entry::FwSvc(public, proto, value, len) => {
                let data = FwSvcData {
                    public: public.octets(),
                    proto,
                    service: value.to_be_bytes(),
                    _pad: 0,
                };
                let k = LpmKey::new(FW_SVC_BASE_BITS + u32::from(len), data);
                write(self, MAP_FW_SVC, k, bits)
            }
            Entry::EgDst(cidr) => {
                let k = LpmKey::new(u32::from(cidr.prefix_len()), cidr.addr().octets());
                write(self, MAP_EG_DST, k, bits)
            }
            Entry::EgSvc(proto, value, len) => {
                let (plen, data) = match proto {
                    None => (0, EgSvcData::default()),
                    Some(proto) => (
                        EG_SVC_BASE_BITS + u32::from(len),
                        EgSvcData {
                            proto,
                            service: value.to_be_bytes(),
                            _pad: 0,
                        },
                    ),
                };
                write(self, MAP_EG_SVC, LpmKey::new(plen, data), bits)
            }
        }
    }

    /// Writes the program's settings (egress default and conntrack timeouts).
    pub fn write_config(&mut self, cfg: &NatConfig) -> Result<(), DataplaneError> {
        let mut arr = Array::<_, NatConfig>::try_from(self.map(MAP_CONFIG)?).map_err(|source| {
            DataplaneError::Map {
                map: MAP_CONFIG,
                source,
            }
        })?;
        arr.set(0, cfg, 0).map_err(|source| DataplaneError::Map {
            map: MAP_CONFIG,
            source,
        })
    }

    pub fn config(&mut self) -> Result<NatConfig, DataplaneError> {
        let arr = Array::<_, NatConfig>::try_from(self.map(MAP_CONFIG)?).map_err(|source| {
            DataplaneError::Map {
                map: MAP_CONFIG,
                source,
            }
        })?;
        arr.get(&0, 0).map_err(|source| DataplaneError::Map {
            map: MAP_CONFIG,
            source,
        })
    }

    /// Sums the per-CPU event counters.
    pub fn events(&mut self) -> Result<BTreeMap<Event, u64>, DataplaneError> {
        let arr = PerCpuArray::<_, u64>::try_from(self.map(MAP_EVENTS)?).map_err(|source| {
            DataplaneError::Map {
                map: MAP_EVENTS,
                source,
            }
        })?;
        let mut out = BTreeMap::new();
        for e in Event::ALL {
            let v = arr
                .get(&(e as u32), 0)
                .map_err(|source| DataplaneError::Map {
                    map: MAP_EVENTS,
                    source,
                })?;
            out.insert(e, v.iter().sum());
        }
        Ok(out)
    }

    /// Adds `n` to a natd-written event counter (CPU 0's slot; the program never writes it).
    pub fn bump_event(&mut self, e: Event, n: u64) -> Result<(), DataplaneError> {
        let mut arr = PerCpuArray::<_, u64>::try_from(self.map(MAP_EVENTS)?).map_err(|source| {
            DataplaneError::Map {
                map: MAP_EVENTS,
                source,
            }
        })?;
        let v = arr
            .get(&(e as u32), 0)
            .map_err(|source| DataplaneError::Map {
                map: MAP_EVENTS,
                source,
            })?;
        let mut v: Vec<u64> = v.iter().copied().collect();
        if let Some(first) = v.first_mut() {
            *first += n;
        }
        let v = PerCpuValues::try_from(v).map_err(|source| DataplaneError::Map {
            map: MAP_EVENTS,
            source: MapError::IoError(source),
        })?;
        arr.set(e as u32, v, 0)
            .map_err(|source| DataplaneError::Map {
                map: MAP_EVENTS,
                source,
            })
    }

    fn conntrack(
        &mut self,
    ) -> Result<aya::maps::HashMap<&mut MapData, FlowKey, FlowState>, DataplaneError> {
        aya::maps::HashMap::try_from(self.map(MAP_CONNTRACK)?).map_err(|source| {
            DataplaneError::Map {
                map: MAP_CONNTRACK,
                source,
            }
        })
    }

    /// Every flow in the connection table (entries that vanish while we read are skipped).
    pub fn flows(&mut self) -> Result<Vec<(FlowKey, FlowState)>, DataplaneError> {
        let ct = self.conntrack()?;
        let mut out = Vec::new();
        for item in ct.iter() {
            match item {
                Ok(kv) => out.push(kv),
                Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(DataplaneError::Map {
                        map: MAP_CONNTRACK,
                        source,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Deletes the flows `pred` selects; returns how many went and how many were looked at.
    pub fn remove_flows(
        &mut self,
        pred: impl Fn(&FlowKey, &FlowState) -> bool,
    ) -> Result<(usize, usize), DataplaneError> {
        let all = self.flows()?;
        let seen = all.len();
        let doomed: Vec<FlowKey> = all
            .into_iter()
            .filter(|(k, v)| pred(k, v))
            .map(|(k, _)| k)
            .collect();
        let mut ct = self.conntrack()?;
        let mut n = 0;
        for k in doomed {
            match ct.remove(&k) {
                Ok(()) => n += 1,
                Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(DataplaneError::Map {
                        map: MAP_CONNTRACK,
                        source,
                    });
                }
            }
        }
        Ok((n, seen))
    }

    /// Capacity of the connection table.
    pub fn conntrack_capacity(&mut self) -> Result<u32, DataplaneError> {
        let map = self.map(MAP_CONNTRACK)?;
        Ok(match map {
            aya::maps::Map::LruHashMap(m) | aya::maps::Map::HashMap(m) => {
                m.info().map(|i| i.max_entries()).unwrap_or(0)
            }
            _ => 0,
        })
    }
}

impl FastPath for Dataplane {
    fn apply(&mut self, op: &Op) -> Result<(), DataplaneError> {
        match *op {
            Op::AddMapping(m) => self.insert_mapping(m),
            Op::RemoveMapping(m) => self.remove_mapping(m),
            Op::Set(e, b) => self.set_entry(e, Some(b)),
            Op::Unset(e) => self.set_entry(e, None),
            Op::EgressDefaultDeny(deny) => {
                let mut cfg = self.config()?;
                cfg.egress_default_deny = u32::from(deny);
                self.write_config(&cfg)
            }
        }
    }
}
