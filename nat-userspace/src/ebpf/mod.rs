//! Typed wrapper over the loaded XDP object: the only place that knows map layouts on the
//! userspace side. Split by concern: loading (here), [`attach`] (XDP links, the tc learner,
//! re-attachment), [`maps`] (mappings, firewall entries, counters, flows), [`adopt`]
//! (reading back what pinned maps hold), [`plan`] (adopt, migrate or refuse each pin) and
//! [`migrate`] (re-creating a pinned map at another capacity, or of an [`earlier`] layout,
//! converting its entries). Write order keeps a mapping whole at every instant: the reverse
//! (private -> public) entry goes in before the forward one, and comes out after it.
mod adopt;
mod attach;
mod batch;
pub mod earlier;
mod flows;
mod maps;
mod migrate;
pub mod plan;
mod slots;
pub mod slotview;
#[cfg(test)]
mod upgrade_tests;

pub use flows::{FlowView, Sweep};
pub use maps::write_entry;
pub use slotview::{SlotView, SlotViewError};

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::MapInfo,
    maps::{
        Array, DevMapHash, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues,
        lpm_trie::Key as LpmKey,
    },
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::SchedClassifierLinkId,
        xdp::{XdpLink, XdpLinkId},
    },
};
use nat_common::{
    Counter, EG_SVC_BASE_BITS, EgSvcData, Event, FW_SRC_BASE_BITS, FW_SVC_BASE_BITS, FlowEntry,
    FlowKey, FlowTuple, FwSrcData, FwSvcData, IfaceConfig, MAP_CONFIG, MAP_DEVMAP, MAP_EG_DST,
    MAP_EG_SRC, MAP_EG_SVC, MAP_EVENTS, MAP_FLOWS, MAP_FW_SRC, MAP_FW_SVC, MAP_IFACES,
    MAP_MAPPING_STATS, MAP_META, MAP_NAT_IN, MAP_NAT_OUT, MAP_PENDING, MAP_SLOTS, MAP_STATS,
    MappingStats, NatConfig, NatValue, ROLE_GUEST, ROLE_PUBLIC, Reason, RuleBits, maps as spec,
};

use crate::{
    cidr::Cidr,
    pins::PinDir,
    state::{DesiredState, Mapping},
    tables::{Entry, Op, Tables, egress_mode},
};

/// Name of the XDP program in the object.
pub const PROGRAM: &str = "nat";
/// Name of the tc egress learner (see nat-ebpf/src/learn.rs).
pub const LEARNER: &str = "learn";
/// Name of the tc ingress marker (see nat-ebpf/src/mark.rs).
pub const MARKER: &str = "mark";

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
    #[error(
        "the flow cache SLOTS has {map} slots, but the program was loaded to use {loaded}; \
         natd does not run a cache it would use in part"
    )]
    SlotCount { map: u32, loaded: u32 },
    #[error(transparent)]
    Slots(#[from] SlotViewError),
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
    /// (natd adds how to run it in generic mode.)
    #[error("cannot attach XDP to {iface} in native mode: {source}")]
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
    #[error("cannot attach the tc ingress marker to {iface}: {source}")]
    Marker {
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
    #[error("cannot read the pinned map {path}: {source}")]
    ReadPin {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    /// The pins cannot be adopted or migrated; nothing was changed.
    #[error("{}", plan::refusal_text(.dir, .mismatches, .remedy))]
    Refused {
        /// The pin directory (`--bpffs`).
        dir: PathBuf,
        mismatches: Vec<plan::Mismatch>,
        remedy: plan::Remedy,
    },
    #[error("no migration is known for map {0}")]
    NoMigration(&'static str),
    #[error("cannot put the migrated map's pin {from} in place of {to}: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no counter slot left for a new mapping: all {capacity} are taken (natd's [limits] mappings)"
    )]
    NoSlot { capacity: u32 },
    #[error("cannot count possible CPUs ({0}): {1}")]
    Cpus(&'static str, std::io::Error),
    #[error("link: {0}")]
    Link(#[from] LinkError),
}

/// The interface and counter types natd reports are nat-api's, at their old paths.
pub use nat_api::report::{Attached, MappingCounters, Mode, Role};

/// The role's value in the program's `IFACES` map.
const fn role_raw(role: Role) -> u32 {
    match role {
        Role::Public => ROLE_PUBLIC,
        Role::Guest => ROLE_GUEST,
    }
}

/// Writes the fast path's maps, one [`Op`] at a time. A trait so the reconciler can be tested
/// without BPF.
pub trait FastPath {
    fn apply(&mut self, op: &Op) -> Result<(), DataplaneError>;

    /// A batch of [`FastPath::apply`] calls starts: what they read from the kernel (the
    /// public interfaces' subnets) may be read once for all of them, until [`FastPath::end`].
    fn begin(&mut self) {}

    /// The batch ended: the next change reads the kernel again.
    fn end(&mut self) {}
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
    /// The tc ingress marker's attachments, held like the learner's.
    markers: Vec<(String, SchedClassifierLinkId)>,
    /// Counter slots of the mappings (see [`slots::Slots`]).
    slots: slots::Slots,
    sizes: Sizes,
    /// The public interfaces' (ifindex, subnets), read once per batch of changes (see
    /// [`FastPath::begin`]); `None` outside a batch.
    public_subnets: Option<PublicSubnets>,
}

/// Each public interface's ifindex with the IPv4 subnets on it.
type PublicSubnets = Vec<(u32, Vec<(std::net::Ipv4Addr, u32)>)>;

/// Capacities natd chooses at load (config `[conntrack] size`, `[limits] mappings`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// Assured flows `FLOWS` holds (two entries each); `PENDING` holds half as many
    /// unassured ones.
    pub flows: u32,
    /// Mappings: the size of `NAT_IN`, `NAT_OUT` and `MAPPING_STATS`.
    pub mappings: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Sizes {
            flows: nat_common::DEFAULT_CONNTRACK_SIZE,
            mappings: nat_common::DEFAULT_MAPPINGS,
        }
    }
}

impl Sizes {
    /// The capacity of `map` these sizes give, for the maps natd sizes at load.
    pub fn of(&self, map: &str) -> Option<u32> {
        Some(match map {
            MAP_FLOWS => self.flows.saturating_mul(2),
            MAP_PENDING => self.flows.max(2),
            MAP_NAT_IN | MAP_NAT_OUT | MAP_MAPPING_STATS => self.mappings,
            MAP_SLOTS => spec::slots_for(self.flows),
            _ => return None,
        })
    }
}

/// How natd holds an interface's XDP attachment.
enum Held {
    /// Owned by the program object: detached when natd exits.
    Owned(XdpLinkId),
    /// A pinned bpf_link: stays attached when natd exits, until its pin is removed.
    Pinned(FdLink, PathBuf),
}

pub fn ifindex(name: &str) -> Result<u32, DataplaneError> {
    nix::net::if_::if_nametoindex(name).map_err(|_| DataplaneError::UnknownIface(name.to_string()))
}

/// The first IPv4 address of interface `name`, if it has one.
pub fn iface_ipv4(name: &str) -> Option<std::net::Ipv4Addr> {
    iface_subnets(name).first().map(|(a, _)| *a)
}

/// Whether one of `subnets` (address, netmask in host order) holds `ip`.
pub fn subnets_hold(subnets: &[(std::net::Ipv4Addr, u32)], ip: std::net::Ipv4Addr) -> bool {
    subnets
        .iter()
        .any(|(a, mask)| u32::from(*a) & mask == u32::from(ip) & mask)
}

/// The IPv4 addresses of interface `name` with their netmasks (host order).
pub fn iface_subnets(name: &str) -> Vec<(std::net::Ipv4Addr, u32)> {
    all_subnets()
        .into_iter()
        .filter(|(n, _)| n == name)
        .map(|(_, net)| net)
        .collect()
}

/// Every interface's IPv4 addresses with their netmasks (host order), by interface name, from
/// one `getifaddrs` (empty if it fails).
pub fn all_subnets() -> Vec<(String, (std::net::Ipv4Addr, u32))> {
    let Ok(all) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    all.filter_map(|ifa| {
        let addr = ifa.address?.as_sockaddr_in()?.ip();
        let mask = ifa
            .netmask
            .and_then(|m| m.as_sockaddr_in().map(|s| u32::from(s.ip())))
            .unwrap_or(u32::MAX);
        Some((ifa.interface_name, (addr, mask)))
    })
    .collect()
}

/// The map behind `map`, for the kinds natd's and the bench's programs declare.
pub fn map_data(map: &aya::maps::Map) -> Option<&MapData> {
    use aya::maps::Map;
    match map {
        Map::Array(d)
        | Map::PerCpuArray(d)
        | Map::HashMap(d)
        | Map::PerCpuHashMap(d)
        | Map::LruHashMap(d)
        | Map::LpmTrie(d)
        | Map::DevMapHash(d)
        | Map::Unsupported(d) => Some(d),
        _ => None,
    }
}

/// The `memlock` line of the map's fdinfo: the bytes the kernel charges for it.
pub fn memlock(map: &MapData) -> Option<u64> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The error of a map operation on `map`.
fn map_err(map: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

fn addr(raw: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(raw.to_ne_bytes())
}

fn key(addr: std::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

impl Dataplane {
    /// Loads the embedded object and its program into the kernel (nothing attached yet).
    pub fn load(sizes: Sizes) -> Result<Self, DataplaneError> {
        Self::open(crate::EBPF_OBJECT, sizes, None)
    }

    /// Loads `object`; with `pins`, every map is adopted from its pin if one exists (an earlier
    /// natd's state, connection table and counters) and pinned otherwise. Pins of another
    /// capacity are migrated where their spec allows it ([`migrate`]); anything else that
    /// differs from this natd's layout is refused before anything is changed ([`plan`]).
    pub fn open(object: &[u8], sizes: Sizes, pins: Option<PinDir>) -> Result<Self, DataplaneError> {
        // The flow cache's sequence lock needs loads kept in order with loads (see
        // `spec::SLOT_CACHE_GLOBAL`).
        let cache = u32::from(cfg!(target_arch = "x86_64"));
        if cache == 0 {
            log::warn!(
                "the flow cache (SLOTS) is off on this architecture: every established packet \
                 looks its flow up in FLOWS"
            );
        }
        let mut plan = Vec::new();
        if let Some(p) = &pins {
            plan = adopt::read_pins(p, &sizes)?;
            migrate::check_fit(p, &plan)?;
            migrate::clear_staging(p)?;
        }
        let mut loader = aya::EbpfLoader::new();
        loader.override_global(spec::SLOT_CACHE_GLOBAL, &cache, true);
        for m in spec::MAPS {
            if let Some(n) = sizes.of(m.name) {
                loader.map_max_entries(m.name, n);
            }
        }
        // The flow cache's slot mask matches the map the program gets: the configured one,
        // or a pinned one kept at its capacity.
        let slots = match plan.iter().find(|(m, _)| m.name == MAP_SLOTS) {
            Some((_, plan::Action::Keep { kept, wanted })) => {
                log::info!(
                    "kept the pinned SLOTS at {kept} slots ([conntrack] size asks for \
                     {wanted}): the flow cache takes the configured size when natd next \
                     creates the fast path's maps"
                );
                *kept
            }
            _ => spec::slots_for(sizes.flows),
        };
        let slot_mask = slots - 1;
        loader.map_max_entries(MAP_SLOTS, slots);
        loader.override_global(spec::SLOT_MASK_GLOBAL, &slot_mask, true);
        if let Some(p) = &pins {
            for (m, action) in &plan {
                loader.map_pin_path(m.name, migrate::pin_path(p, m.name, *action));
            }
        }
        let adopted = plan.iter().any(|(_, a)| *a != plan::Action::Create);
        let loaded = Self::load_with(loader, object, sizes, pins.clone(), adopted);
        let mut dp = match &pins {
            Some(p) if plan.iter().any(|(_, a)| a.migrates()) => migrate::finish(loaded, p, &plan)?,
            _ => loaded?,
        };
        // The program masks slot indices by what natd told it: the map must be that size.
        let map = match dp.map(MAP_SLOTS)? {
            aya::maps::Map::Array(d) => d.info().map_err(map_err(MAP_SLOTS))?.max_entries(),
            _ => return Err(DataplaneError::MissingMap(MAP_SLOTS)),
        };
        if map.checked_sub(1) != Some(slot_mask) {
            return Err(DataplaneError::SlotCount {
                map,
                loaded: slot_mask.wrapping_add(1),
            });
        }
        dp.stamp_layout()?;
        Ok(dp)
    }

    /// Loads the object and its programs into the kernel with `loader`'s maps.
    fn load_with(
        mut loader: aya::EbpfLoader,
        object: &[u8],
        sizes: Sizes,
        pins: Option<PinDir>,
        adopted: bool,
    ) -> Result<Self, DataplaneError> {
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
        let marker: &mut SchedClassifier = ebpf
            .program_mut(MARKER)
            .ok_or(DataplaneError::MissingProgram)?
            .try_into()
            .map_err(DataplaneError::Program)?;
        marker.load().map_err(DataplaneError::Program)?;
        let nr_cpus = aya::util::nr_cpus().map_err(|(what, e)| DataplaneError::Cpus(what, e))?;
        Ok(Self {
            ebpf,
            nr_cpus,
            attached: Vec::new(),
            learners: Vec::new(),
            markers: Vec::new(),
            pins,
            adopted,
            slots: slots::Slots::new(sizes.mappings),
            public_subnets: None,
            sizes,
        })
    }

    /// The capacities the maps were loaded with.
    pub fn sizes(&self) -> Sizes {
        self.sizes
    }

    /// The kernel memory each of the program's maps takes, as the kernel counts it (the
    /// `memlock` of its fdinfo: an estimate from the map's sizes before Linux 6.4, the
    /// map's own account from 6.4), largest first; maps the kernel says nothing of are left
    /// out.
    pub fn memory(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .ebpf
            .maps()
            .filter_map(|(name, m)| Some((name.to_string(), memlock(map_data(m)?)?)))
            .collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
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
    ) -> Result<HashMap<&mut MapData, u32, NatValue>, DataplaneError> {
        HashMap::try_from(self.map(name)?).map_err(map_err(name))
    }

    /// Writes this natd's [`spec::LAYOUT_VERSION`] into `META`.
    fn stamp_layout(&mut self) -> Result<(), DataplaneError> {
        let mut m = Array::<_, u32>::try_from(self.map(MAP_META)?).map_err(map_err(MAP_META))?;
        m.set(0, spec::LAYOUT_VERSION, 0).map_err(map_err(MAP_META))
    }
}
