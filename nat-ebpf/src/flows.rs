//! The flow table: lookups in `FLOWS` (assured flows) then `PENDING`, entry creation,
//! state-dependent flags, promotion of a flow that became assured, removal, and the clocks.
use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use nat_common::{
    COUNT_IN, COUNT_OUT, ENTRY_FAST, ENTRY_ORIG, ENTRY_PENDING, ENTRY_UDP, Event, FLOW_HAIRPIN,
    FLOW_NAT, FlowEntry, FlowKey, FlowTuple, NatConfig, ORIGIN_GUEST, ORIGIN_PUBLIC, Reason,
    conntrack::{ASSURED, Config, Conn, State, Timeout},
    flow::{Rewrite, reply_of, rewrite},
    proto,
};

use crate::{CONFIG, FLOWS, PENDING, SCRATCH, forward::Route, slots, stats};

/// An entry found by [`lookup`].
#[derive(Clone, Copy)]
pub struct Found {
    pub entry: *mut FlowEntry,
    /// It lives in `PENDING`.
    pub pending: bool,
}

/// The entry keyed `t`: assured flows first, the only lookup an established packet makes.
#[inline(always)]
pub fn lookup(t: &FlowTuple) -> Option<Found> {
    if let Some(entry) = FLOWS.get_ptr_mut(t) {
        slots::take(t, entry);
        return Some(Found {
            entry,
            pending: false,
        });
    }
    // A slot whose entry is gone.
    slots::take(t, core::ptr::null_mut());
    PENDING.get_ptr_mut(t).map(|entry| Found {
        entry,
        pending: true,
    })
}

/// [`lookup`] without the slot: the entry as `FLOWS` or `PENDING` holds it.
#[inline(always)]
fn find(t: &FlowTuple) -> Option<Found> {
    if let Some(entry) = FLOWS.get_ptr_mut(t) {
        return Some(Found {
            entry,
            pending: false,
        });
    }
    PENDING.get_ptr_mut(t).map(|entry| Found {
        entry,
        pending: true,
    })
}

/// The `FLOWS` entry keyed `t`, without its slot's changes (for [`slots`] alone).
#[inline(always)]
pub fn flows_entry(t: &FlowTuple) -> Option<*mut FlowEntry> {
    FLOWS.get_ptr_mut(t)
}

/// The entry keyed `t` in the table a flow's other entry lives in.
#[inline(always)]
pub fn lookup_in(pending: bool, t: &FlowTuple) -> Option<*mut FlowEntry> {
    if pending {
        PENDING.get_ptr_mut(t)
    } else {
        let e = FLOWS.get_ptr_mut(t);
        slots::take(t, e.unwrap_or(core::ptr::null_mut()));
        e
    }
}

#[inline(always)]
fn remove_in(pending: bool, t: &FlowTuple) {
    let _ = if pending {
        PENDING.remove(t)
    } else {
        slots::take(t, core::ptr::null_mut());
        FLOWS.remove(t)
    };
}

/// Removes both entries of a flow.
#[inline(always)]
pub fn remove_flow(pending: bool, a: &FlowTuple, b: &FlowTuple) {
    remove_in(pending, a);
    remove_in(pending, b);
}

/// natd's settings, if written.
#[inline(always)]
pub fn config() -> Option<&'static NatConfig> {
    CONFIG.get(0)
}

/// Whether the kernel judges new flows (`--policy kernel`).
#[inline(always)]
pub fn kernel_policy() -> bool {
    config().is_some_and(|c| c.policy == nat_common::POLICY_KERNEL)
}

/// The route generation entries must carry to be used as they are.
#[inline(always)]
pub fn route_gen() -> u32 {
    route_gen_in(config())
}

/// [`route_gen`] from settings already read.
#[inline(always)]
pub fn route_gen_in(cfg: Option<&NatConfig>) -> u32 {
    cfg.map_or(0, |c| c.route_gen)
}

/// Jiffies between two refreshes of a flow's last-seen time (a second), from settings
/// already read.
#[inline(always)]
pub fn refresh_jiffies_in(cfg: Option<&NatConfig>) -> u64 {
    match cfg.map_or(0, |c| c.jiffies_per_sec) {
        0 => 1000,
        j => j as u64,
    }
}

/// `bpf_jiffies64()`: the verifier inlines it into one load on 64-bit JITs.
#[inline(always)]
pub fn jiffies() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_jiffies64() }
}

/// CLOCK_MONOTONIC, the clock natd's collector compares with. Read only on the full path
/// (the established path reads [`coarse_ns`]): precise, so that a flow's age is exact
/// whatever the tick.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// CLOCK_MONOTONIC as of the last tick (`bpf_ktime_get_coarse_ns`, Linux 5.11): what the
/// established path reads once a second per flow direction to refresh its last-seen time,
/// which it keeps to a second anyway. A load of the timekeeper's value, where
/// `bpf_ktime_get_ns` reads the clock source (about 30 ns in section 1b of the bench). Up to a
/// tick behind [`now_ns`]: a last-seen time the full path wrote within that tick is later
/// than it, and an age computed from it wraps (not live, see `fast::refresh`).
#[inline(always)]
pub fn coarse_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// netfilter's tracking settings as the program applies them: it keeps no TCP windows and
/// nothing of the last packet yet, so only the flags of a segment count (netfilter with
/// `nf_conntrack_tcp_no_window_check=1`).
pub const TRACKING: Config = Config {
    tcp_no_window_check: true,
    ..Config::NETFILTER
};

/// Idle timeout of a timer slot: natd's setting, or netfilter's default if natd set none.
#[inline(always)]
pub fn timeout_ns(t: Timeout) -> u64 {
    let configured = config()
        .and_then(|c| c.timeouts_ns.get(t as usize).copied())
        .unwrap_or(0);
    if configured != 0 {
        configured
    } else {
        t.default_secs() * 1_000_000_000
    }
}

/// The flow state an original entry holds, as the state machine takes it.
#[inline(always)]
pub fn conn(orig: &FlowEntry) -> Conn {
    Conn::forgotten(
        State::from_u8(orig.state).unwrap_or(State::Other),
        orig.ct_flags,
        Timeout::from_u8(orig.timer).unwrap_or(Timeout::Other),
    )
}

/// Whether the flow of the entries `orig` and `reply` has been idle past its timer: its
/// last-seen time is the later of both entries' (each direction refreshes its own).
#[inline(always)]
pub fn expired(orig: &FlowEntry, reply: &FlowEntry, now: u64) -> bool {
    let timer = Timeout::from_u8(orig.timer).unwrap_or(Timeout::Other);
    now.wrapping_sub(orig.last_seen.max(reply.last_seen)) > timeout_ns(timer)
}

/// Whether entry `e` alone shows its flow live at `now`: it was seen within the flow's
/// timeout (the original entry's timer; a reply entry's copy of it, taken by [`settle`] and
/// by the established path's refresh, and trusted only once its direction was seen). Not
/// shown live does not mean expired: the other entry may have been seen later.
#[inline(always)]
pub fn live_by(e: &FlowEntry, now: u64) -> bool {
    let timer = Timeout::from_u8(e.timer).unwrap_or(Timeout::Other);
    e.last_seen != 0 && now.wrapping_sub(e.last_seen) <= timeout_ns(timer)
}

/// The FAST flag of an assured flow's entries in `state`: a packet without SYN, FIN or RST
/// leaves an ESTABLISHED TCP flow, a replied UDP flow or another protocol's flow as it is
/// (netfilter restarts the same timer). Flows not assured yet (in `PENDING`) take the full
/// path for every packet: their next packets make them assured.
#[inline(always)]
pub fn fast_flag(state: State) -> u8 {
    match state {
        State::TcpEstablished | State::UdpReplied | State::Icmp | State::Other => ENTRY_FAST,
        _ => 0,
    }
}

/// Which way a new flow goes through the router.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Opened from the public side to a public IP (DNAT).
    Inbound,
    /// Opened by a guest towards the public side (SNAT).
    Outbound,
    /// Opened by a guest to another guest's public IP.
    Hairpin,
}

/// What a new flow's entries are made of (the reply direction's key and rewrite follow from
/// the original's by [`reply_of`]).
pub struct NewFlow<'a> {
    /// The original direction: its key (the packet as it arrived) and what it becomes.
    pub orig: FlowTuple,
    pub orig_to: FlowTuple,
    pub kind: Kind,
    /// State, status bits and timer the first packet opened it with.
    pub conn: (u8, u8, u8),
    /// Where the original direction arrived and the route it takes.
    pub ingress: u32,
    pub route: &'a Route,
    pub slot: u32,
}

impl NewFlow<'_> {
    /// The flow in the guest's view.
    #[inline(always)]
    fn key(&self) -> FlowKey {
        let (o, t) = (&self.orig, &self.orig_to);
        // ICMP queries: the identifier and the type the guest sends.
        let (sport, dport) = if o.proto == proto::ICMP {
            let ty = o.dport.to_ne_bytes()[1];
            let from_guest = !matches!(self.kind, Kind::Inbound);
            let guest_ty = nat_common::conntrack::icmp_flow_type(ty, from_guest).unwrap_or(ty);
            let guest_ty = u16::from_ne_bytes([0, guest_ty]);
            if from_guest {
                (o.sport, guest_ty)
            } else {
                (guest_ty, o.sport)
            }
        } else {
            (o.sport, o.dport)
        };
        let (guest, remote, guest_port, remote_port, kind, origin) = match self.kind {
            Kind::Inbound => (t.daddr, o.saddr, dport, sport, FLOW_NAT, ORIGIN_PUBLIC),
            Kind::Outbound => (o.saddr, o.daddr, sport, dport, FLOW_NAT, ORIGIN_GUEST),
            Kind::Hairpin => (o.saddr, o.daddr, sport, dport, FLOW_HAIRPIN, ORIGIN_GUEST),
        };
        FlowKey {
            guest,
            remote,
            guest_port,
            remote_port,
            proto: o.proto,
            kind,
            origin,
            _pad: 0,
        }
    }

    /// Reason and counter half of the original direction, then of the reply direction.
    #[inline(always)]
    fn counts(&self) -> [(Reason, u8); 2] {
        match self.kind {
            Kind::Inbound => [
                (Reason::InboundForwarded, COUNT_IN),
                (Reason::OutboundForwarded, COUNT_OUT),
            ],
            Kind::Outbound => [
                (Reason::OutboundForwarded, COUNT_OUT),
                (Reason::InboundForwarded, COUNT_IN),
            ],
            Kind::Hairpin => [
                (Reason::HairpinForwarded, COUNT_IN),
                (Reason::HairpinForwarded, COUNT_OUT),
            ],
        }
    }
}

/// Fills `e` with `rw` applied and nothing resolved.
#[inline(always)]
pub fn fill(e: &mut FlowEntry, rw: &Rewrite, flags: u8) {
    zero(e);
    e.saddr = rw.saddr;
    e.daddr = rw.daddr;
    e.sport = rw.sport;
    e.dport = rw.dport;
    e.ip_delta = rw.ip_delta;
    e.l4_delta = rw.l4_delta;
    e.l4_csum = rw.l4_csum;
    e.flags = flags | if rw.udp { ENTRY_UDP } else { 0 };
}

/// Zeroes `*v` with 8-byte stores.
///
/// For the compiler only: zeroing written any other way (an assignment of zeros,
/// `..Default::default()`, adjacent zero fields) becomes a call to `memset`, which the eBPF
/// target implements as a loop of single-byte stores: the 64 bytes of a route request cost
/// about 260 instructions, a new flow's two entries several hundred more. Volatile stores are
/// neither merged into that call nor dropped.
#[inline(always)]
pub fn zero<T>(v: &mut T) {
    const {
        assert!(core::mem::size_of::<T>() % 8 == 0 && core::mem::align_of::<T>() >= 8);
    }
    let w = v as *mut T as *mut u64;
    for i in 0..core::mem::size_of::<T>() / 8 {
        // SAFETY: in bounds and aligned, per the assertion above; `T` is plain data here (map
        // values and the route request), for which all zeros is a valid value.
        unsafe { core::ptr::write_volatile(w.add(i), 0) };
    }
}

/// Writes the route fields of `e`.
#[inline(always)]
pub fn set_route(e: &mut FlowEntry, r: &Route, generation: u32) {
    e.out_ifindex = r.ifindex;
    e.dmac = r.dmac;
    e.smac = r.smac;
    e.mtu = r.mtu;
    e.route_gen = generation;
}

/// This CPU's scratch space (see `nat_common::maps::SCRATCH`): XDP runs in softirq and the
/// tc programs with bottom halves disabled, so one never interrupts another's use of it.
#[inline(always)]
pub fn scratch() -> Option<&'static mut nat_common::Scratch> {
    // SAFETY: this CPU's slot; nothing else uses it while the program runs (see above).
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Opens a flow: both entries, in `PENDING` (a new flow is not assured). The reply entry's
/// route is resolved by its first packet; it arrives where the original direction left.
/// The entries are built in this CPU's scratch slots and inserted from there (keys included),
/// which keeps them off the BPF stack. Returns the original entry as written, for the
/// packet's own rewrite.
#[inline(always)]
pub fn create(f: &NewFlow) -> Option<&'static FlowEntry> {
    let now = now_ns();
    let j = jiffies();
    let [o, r] = &mut scratch()?.entries;
    // The reply direction: answers to what the original direction becomes, turned back into
    // what its sender expects.
    fill(
        r,
        &rewrite(&reply_of(&f.orig_to), &reply_of(&f.orig)),
        ENTRY_PENDING,
    );
    r.in_ifindex = f.route.ifindex;
    r.slot = f.slot;
    let counts = f.counts();
    (r.reason, r.counter) = (counts[1].0 as u8, counts[1].1);
    r.seen = j;
    r.peer = f.orig;
    r.flow = f.key();

    fill(o, &rewrite(&f.orig, &f.orig_to), ENTRY_ORIG | ENTRY_PENDING);
    o.in_ifindex = f.ingress;
    set_route(o, f.route, route_gen());
    o.slot = f.slot;
    (o.reason, o.counter) = (counts[0].0 as u8, counts[0].1);
    (o.state, o.ct_flags, o.timer) = f.conn;
    o.seen = j;
    o.last_seen = now;
    o.peer = reply_of(&f.orig_to);
    o.flow = r.flow;

    // Another flow may hold the reply's key (a hairpin flow's reply V1 -> R, and a packet
    // from R on the public side to P1): that flow goes, both its entries, as a map insert
    // replaces an entry; left alone, its other entry would name an entry of this flow.
    // Found without reading the key's slot (a cold line for every new flow): an entry found
    // is removed, which empties its slot (`remove_in`); a slot left over from an evicted flow
    // of that key is emptied when the flow is promoted (`settle`).
    if let Some(other) = find(&o.peer) {
        // SAFETY: a live map value.
        let other_peer = unsafe { (*other.entry).peer };
        remove_flow(other.pending, &o.peer, &other_peer);
    }
    // Reply first: an original entry never exists without its reply entry. `o.peer` is the
    // reply's key, `r.peer` the original's.
    if PENDING.insert(&o.peer, &*r, 0).is_ok() {
        if PENDING.insert(&r.peer, &*o, 0).is_ok() {
            stats::event(Event::ConntrackCreate);
        } else {
            let _ = PENDING.remove(&o.peer);
        }
    }
    Some(o)
}

/// After the state of the flow changed: an assured flow's entries get their FAST flag from
/// the state, and a flow that just became assured moves from `PENDING` to `FLOWS` (reply
/// entry first, then the original; on a failed insert it stays pending). The entries are
/// inserted from their map values, not copied to the stack.
#[inline(always)]
pub fn settle(pending: bool, orig: *mut FlowEntry, reply: *mut FlowEntry) {
    // SAFETY: live map values; plain fields another CPU may race on, which at worst repeats
    // a step on the next packet.
    let (o, r) = unsafe { (&mut *orig, &mut *reply) };
    let fast = fast_flag(State::from_u8(o.state).unwrap_or(State::Other));
    // The reply entry's copy of the timer (see [`live_by`]).
    r.timer = o.timer;
    if !pending {
        o.flags = (o.flags & !ENTRY_FAST) | fast;
        r.flags = (r.flags & !ENTRY_FAST) | fast;
        return;
    }
    if o.ct_flags & ASSURED == 0 {
        return;
    }
    let (orig_key, reply_key) = (r.peer, o.peer);
    o.flags = (o.flags & !ENTRY_PENDING) | fast;
    r.flags = (r.flags & !ENTRY_PENDING) | fast;
    // A slot may still hold a copy of an earlier flow of these keys, whose `FLOWS` entries
    // the LRU evicted (nothing empties its slot then): not to be used for this flow.
    slots::take(&reply_key, core::ptr::null_mut());
    slots::take(&orig_key, core::ptr::null_mut());
    if FLOWS.insert(&reply_key, &*r, 0).is_ok() {
        if FLOWS.insert(&orig_key, &*o, 0).is_ok() {
            let _ = PENDING.remove(&orig_key);
            let _ = PENDING.remove(&reply_key);
            return;
        }
        let _ = FLOWS.remove(&reply_key);
    }
    o.flags = (o.flags & !ENTRY_FAST) | ENTRY_PENDING;
    r.flags = (r.flags & !ENTRY_FAST) | ENTRY_PENDING;
}

/// Whether the flow an entry belongs to is live: not idle past its timeout, and for a reply
/// entry its original entry exists (an original entry alone, its reply evicted, is judged
/// by its own last-seen time). An original entry seen within its timeout is live without a
/// second lookup.
#[inline(always)]
pub fn live(f: &Found) -> bool {
    // SAFETY: a live map value.
    let e = unsafe { &*f.entry };
    // The clock is read where it is needed: nothing held across the lookup but the entry
    // (the callers' BPF frames are near the 6.1 verifier's stack limit).
    if e.is_orig() && live_by(e, now_ns()) {
        return true;
    }
    match lookup_in(f.pending, &e.peer) {
        Some(p) => {
            // SAFETY: a live map value.
            let p = unsafe { &*p };
            let (o, r) = if e.is_orig() { (e, p) } else { (p, e) };
            !expired(o, r, now_ns())
        }
        None => e.is_orig() && !expired(e, e, now_ns()),
    }
}

/// Removes the flow of an entry (keyed `key`) found not [`live`].
#[inline(always)]
pub fn remove_stale(f: &Found, key: &FlowTuple) {
    // SAFETY: a live map value.
    let peer = unsafe { (*f.entry).peer };
    remove_flow(f.pending, key, &peer);
}
