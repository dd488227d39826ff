//! The kernel's connection table as `--policy kernel` keeps it in step with the fast path: the
//! kernel's netfilter judges and tracks every flow, and the program carries the established
//! ones it learned without the kernel seeing their packets. So that the kernel never forgets
//! a flow the fast path carries (and `conntrack -L` stays true), natd refreshes the kernel's
//! timeout of every flow the fast path saw recently, and forgets the fast path's flows the
//! kernel ended.
//!
//! XDP carries TCP segments the kernel never sees, so the kernel's idea of each window stops
//! where the fast path took over: natd makes the kernel's TCP tracking liberal about windows
//! ([`make_tcp_liberal`]), as the kernel's own flowtable does for the flows it offloads.
//!
//! The flows' timers are the kernel's: natd takes the idle timeouts from the kernel's own
//! settings ([`kernel_timeouts`]), so a refreshed entry never has more time left than the
//! kernel would have given it had it seen the packets.
//!
//! All over ctnetlink (`netlink-packet-netfilter`), many requests per system call, only
//! failures answered:
//! - a round's one update per flow ([`update`]), and no dump: the update of an entry the
//!   kernel no longer has fails with `ENOENT`, which is how a round learns the flows the
//!   kernel ended, at the cost of a hash lookup each instead of a walk of the kernel's table;
//! - the kernel's destroy events ([`Ended`]), which tell at once of most flows it ends;
//! - the deletion of the kernel's entries of removed mappings and public IPs ([`delete`]):
//!   one dump, then a delete per entry selected.
use std::{collections::HashSet, net::Ipv4Addr, path::Path};

use nat_common::{TIMEOUT_SLOTS, conntrack::Timeout};
use netlink_packet_core::{
    DecodeError, DefaultNla, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer,
    NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla as _, NlasIterator, Parseable as _,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterProtoFamily, NetfilterSubsystem,
    conntrack::{
        ConntrackAttribute, ConntrackMessage, ConntrackMessageType, IPTuple, ProtoTuple, Protocol,
        Status, Tuple,
    },
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

/// `net.netfilter.nf_conntrack_tcp_be_liberal` of natd's network namespace.
pub const TCP_BE_LIBERAL: &str = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal";
/// Where the kernel's connection tracking settings of natd's network namespace are.
const NETFILTER_SYSCTLS: &str = "/proc/sys/net/netfilter";

/// The kernel's setting (`net.netfilter.*`) of a timer slot's timeout; netfilter has none for
/// SYN_SENT2.
fn sysctl_of(t: Timeout) -> Option<&'static str> {
    Some(match t {
        Timeout::TcpSynSent => "nf_conntrack_tcp_timeout_syn_sent",
        Timeout::TcpSynRecv => "nf_conntrack_tcp_timeout_syn_recv",
        Timeout::TcpEstablished => "nf_conntrack_tcp_timeout_established",
        Timeout::TcpFinWait => "nf_conntrack_tcp_timeout_fin_wait",
        Timeout::TcpCloseWait => "nf_conntrack_tcp_timeout_close_wait",
        Timeout::TcpLastAck => "nf_conntrack_tcp_timeout_last_ack",
        Timeout::TcpTimeWait => "nf_conntrack_tcp_timeout_time_wait",
        Timeout::TcpClose => "nf_conntrack_tcp_timeout_close",
        Timeout::TcpSynSent2 => return None,
        Timeout::TcpRetrans => "nf_conntrack_tcp_timeout_max_retrans",
        Timeout::TcpUnack => "nf_conntrack_tcp_timeout_unacknowledged",
        Timeout::UdpUnreplied => "nf_conntrack_udp_timeout",
        Timeout::UdpReplied => "nf_conntrack_udp_timeout_stream",
        Timeout::Icmp => "nf_conntrack_icmp_timeout",
        Timeout::Other => "nf_conntrack_generic_timeout",
    })
}

/// `timeouts_ns` with every slot the kernel has a setting for replaced by the kernel's own,
/// from natd's network namespace (`--policy kernel`: the kernel's timers are the flows'
/// timers); a slot whose setting cannot be read keeps its value. Also returns the names of
/// the slots that changed, with the kernel's seconds.
pub fn kernel_timeouts(
    timeouts_ns: [u64; TIMEOUT_SLOTS],
) -> ([u64; TIMEOUT_SLOTS], Vec<(&'static str, u64)>) {
    kernel_timeouts_at(Path::new(NETFILTER_SYSCTLS), timeouts_ns)
}

fn kernel_timeouts_at(
    dir: &Path,
    mut timeouts_ns: [u64; TIMEOUT_SLOTS],
) -> ([u64; TIMEOUT_SLOTS], Vec<(&'static str, u64)>) {
    let mut changed = Vec::new();
    for t in Timeout::ALL {
        let Some(name) = sysctl_of(t) else {
            continue;
        };
        let secs = std::fs::read_to_string(dir.join(name))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&s| s > 0);
        if let Some(secs) = secs {
            let ns = secs.saturating_mul(1_000_000_000);
            if timeouts_ns[t as usize] != ns {
                timeouts_ns[t as usize] = ns;
                changed.push((t.name(), secs));
            }
        }
    }
    (timeouts_ns, changed)
}

/// A flow by its original tuple as the kernel tracks it (host order; ICMP: identifier and
/// type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelFlow {
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum KernelConntrackError {
    #[error("ctnetlink (is nf_conntrack_netlink available?): {0}")]
    Socket(#[source] std::io::Error),
    #[error("ctnetlink: {0}")]
    Kernel(String),
    #[error("{path} (is nf_conntrack loaded?): {source}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Makes the kernel's TCP connection tracking accept segments outside the windows it saw
/// ([`TCP_BE_LIBERAL`] = 1); returns whether it was off. Without it, the first segment of a
/// fast-path flow the kernel gets again after more than a window went through XDP (the FIN,
/// an RST, a fragment, a segment XDP cannot forward) is INVALID to it: not translated, and
/// dropped by any ruleset that admits only NEW and ESTABLISHED packets, so the connection
/// cannot close. The kernel's flowtable sets the same per flow (`IP_CT_TCP_FLAG_BE_LIBERAL`)
/// for the same reason.
pub fn make_tcp_liberal() -> Result<bool, KernelConntrackError> {
    make_liberal_at(Path::new(TCP_BE_LIBERAL))
}

fn make_liberal_at(path: &Path) -> Result<bool, KernelConntrackError> {
    let err = |source| KernelConntrackError::Sysctl {
        path: path.display().to_string(),
        source,
    };
    let now = std::fs::read_to_string(path).map_err(err)?;
    if now.trim() != "0" {
        return Ok(false);
    }
    std::fs::write(path, "1").map_err(err)?;
    Ok(true)
}

/// Requests per `sendmsg`: the kernel handles them all before the call returns, and the
/// errors they draw (at most one of 36 bytes each, `NETLINK_CAP_ACK`) fit the socket's
/// receive buffer before the next batch goes out.
const BATCH: usize = 256;

/// `CTA_PROTO_ICMP_ID`, `_TYPE` and `_CODE` (`linux/netfilter/nfnetlink_conntrack.h`), which
/// `netlink-packet-netfilter` has no variants for.
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;

/// What a round asks of the kernel's entry of one flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Update {
    /// Nothing: whether the kernel still has the flow (an update that changes nothing).
    Probe,
    /// Its timeout set to `secs` (at least 1), and marked assured if `assured` (a status
    /// bit conntrack only ever sets).
    Refresh { secs: u64, assured: bool },
}

/// What the kernel answered a round's updates.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Answers {
    /// The indices (into the round's flows) of the flows the kernel no longer has.
    pub gone: Vec<usize>,
    /// How many updates the kernel refused otherwise, and the first refusal (the flow and
    /// the error number).
    pub refused: usize,
    pub first_refusal: Option<(KernelFlow, i32)>,
    /// Answers were lost (the socket's receive buffer overran): the flows they were about
    /// are kept, the next round asks again.
    pub lost: bool,
}

/// `IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED`, and `IPS_EXPECTED` for an expected
/// flow's entry: an update's status may only add bits to the entry's, and must name these
/// four as the entry has them (`nf_ct_change_status_common`), so an assured update says a
/// confirmed entry that saw a reply, and is sent again as expected if the kernel refuses it
/// as busy.
fn assured_status(expected: bool) -> Status {
    let s = Status::Confirmed | Status::SeenReply | Status::Assured;
    if expected { s | Status::Expected } else { s }
}

/// Protocols the kernel tracks by ports or keys the fast path does not key their flows by (it
/// translates them at the IP header only): SCTP and GRE. A fast-path flow of one stands for
/// every kernel entry of its protocol and addresses, found by a dump.
fn keyed_by_address(proto: u8) -> bool {
    matches!(proto, 47 | 132)
}

/// The kernel's original tuple of the fast path's flow `f` (not for [`keyed_by_address`]
/// protocols, whose entries have more).
fn tuple_of(f: &KernelFlow) -> Vec<Tuple> {
    let mut proto = vec![ProtoTuple::Protocol(Protocol::from(f.proto))];
    match f.proto {
        6 | 17 | 33 | 136 => {
            proto.push(ProtoTuple::SourcePort(f.sport));
            proto.push(ProtoTuple::DestinationPort(f.dport));
        }
        // The fast path keys an echo by its identifier and type; the kernel's tuple has the
        // code too, 0 for every query message.
        1 => {
            let nla = |kind, value: Vec<u8>| ProtoTuple::Other(DefaultNla::new(kind, value));
            proto.push(nla(CTA_PROTO_ICMP_ID, f.sport.to_be_bytes().to_vec()));
            proto.push(nla(CTA_PROTO_ICMP_TYPE, vec![f.dport as u8]));
            proto.push(nla(CTA_PROTO_ICMP_CODE, vec![0]));
        }
        _ => {}
    }
    vec![
        Tuple::Ip(vec![
            IPTuple::SourceAddress(f.src.into()),
            IPTuple::DestinationAddress(f.dst.into()),
        ]),
        Tuple::Proto(proto),
    ]
}

/// One update a round sends: the kernel entry's original tuple, what to do, and the index of
/// the round's flow it is for.
struct Request {
    tuple: Vec<Tuple>,
    update: Update,
    flow: usize,
}

/// The `IPCTNL_MSG_CT_NEW` request (without `NLM_F_CREATE`: an update of the entry whose
/// original tuple is `tuple`, `ENOENT` if the kernel has none) for `update`, numbered `seq`.
fn request(
    tuple: &[Tuple],
    update: Update,
    expected: bool,
    seq: u32,
) -> NetlinkMessage<NetfilterMessage> {
    let mut attrs = vec![ConntrackAttribute::CtaTupleOrig(tuple.to_vec())];
    if let Update::Refresh { secs, assured } = update {
        attrs.push(ConntrackAttribute::CtaTimeout(
            u32::try_from(secs.max(1)).unwrap_or(u32::MAX),
        ));
        if assured {
            attrs.push(ConntrackAttribute::CtaStatus(assured_status(expected)));
        }
    }
    message(ConntrackMessage::New(attrs), seq, NLM_F_REQUEST)
}

/// A ctnetlink request of IPv4 entries, numbered `seq`.
fn message(body: ConntrackMessage, seq: u32, flags: u16) -> NetlinkMessage<NetfilterMessage> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
            body,
        )),
    );
    msg.finalize();
    msg
}

/// The netlink messages of one datagram the kernel sent (each padded to 4 bytes), up to and
/// including the first that cannot be read.
fn messages(datagram: &[u8]) -> impl Iterator<Item = Result<NetlinkBuffer<&[u8]>, DecodeError>> {
    let mut at = Some(0);
    std::iter::from_fn(move || {
        let from = at.filter(|&a| a < datagram.len())?;
        let msg = NetlinkBuffer::new_checked(&datagram[from..]);
        at = match &msg {
            Ok(m) if m.length() > 0 => Some(from + ((m.length() as usize + 3) & !3)),
            _ => None,
        };
        Some(msg)
    })
}

/// The error number an `NLMSG_ERROR` message carries (`None` for an acknowledgment or
/// another message).
fn errno_of(msg: &NetlinkBuffer<&[u8]>) -> Option<i32> {
    if msg.message_type() != NLMSG_ERROR {
        return None;
    }
    let c = msg.payload().get(..4)?;
    let code = i32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
    (code != 0).then_some(-code)
}

/// A ctnetlink socket: requests go in batches, and only a failed one is answered (no
/// `NLM_F_ACK`); requests are numbered so that an error names its request.
struct Ctnetlink {
    socket: Socket,
    buf: Vec<u8>,
}

impl Ctnetlink {
    fn open() -> Result<Self, KernelConntrackError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(KernelConntrackError::Socket)?;
        socket.bind_auto().map_err(KernelConntrackError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(KernelConntrackError::Socket)?;
        // Errors carry the request's header only, not its attributes.
        socket
            .set_cap_ack(true)
            .map_err(KernelConntrackError::Socket)?;
        Ok(Self {
            socket,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Sends the requests of `batch` (index into `reqs`, and whether it is sent as an
    /// expected flow's), then reads every answer they drew: `(index, errno)`.
    fn send(
        &mut self,
        reqs: &[Request],
        batch: &[(usize, bool)],
        answers: &mut Answers,
        errors: &mut Vec<(usize, i32)>,
    ) -> Result<(), KernelConntrackError> {
        let msgs = batch
            .iter()
            .map(|&(i, expected)| request(&reqs[i].tuple, reqs[i].update, expected, i as u32 + 1));
        self.send_messages(msgs, reqs.len(), answers, errors)
    }

    /// Sends `msgs` (numbered from 1 up to `count`) in one system call, then reads every
    /// answer they drew: `(number - 1, errno)`.
    fn send_messages(
        &mut self,
        msgs: impl Iterator<Item = NetlinkMessage<NetfilterMessage>>,
        count: usize,
        answers: &mut Answers,
        errors: &mut Vec<(usize, i32)>,
    ) -> Result<(), KernelConntrackError> {
        let mut out = Vec::with_capacity(BATCH * 96);
        for msg in msgs {
            let at = out.len();
            out.resize(at + msg.buffer_len(), 0);
            msg.serialize(&mut out[at..]);
        }
        let sent = self
            .socket
            .send(&out, 0)
            .map_err(KernelConntrackError::Socket)?;
        if sent != out.len() {
            return Err(KernelConntrackError::Kernel(format!(
                "sent {sent} of {} bytes",
                out.len()
            )));
        }
        // The kernel handled every request before `send` returned: what they drew is queued.
        loop {
            let n = match self.socket.recv(&mut &mut self.buf[..], libc::MSG_DONTWAIT) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    answers.lost = true;
                    continue;
                }
                Err(e) => return Err(KernelConntrackError::Socket(e)),
            };
            for msg in messages(&self.buf[..n]).map_while(Result::ok) {
                if let Some(errno) = errno_of(&msg)
                    && let Some(i) = (msg.sequence_number() as usize).checked_sub(1)
                    && i < count
                {
                    errors.push((i, errno));
                }
            }
        }
    }
}

impl Ctnetlink {
    /// Dumps the kernel's IPv4 entries; returns the original tuples of those `keep` keeps
    /// (given their original and reply tuples).
    fn dump(
        &mut self,
        mut keep: impl FnMut(&[Tuple], &[Tuple]) -> bool,
    ) -> Result<Vec<Vec<Tuple>>, KernelConntrackError> {
        let msg = message(
            ConntrackMessage::Get(Vec::new()),
            1,
            NLM_F_REQUEST | NLM_F_DUMP,
        );
        let mut out = vec![0; msg.buffer_len()];
        msg.serialize(&mut out);
        self.socket
            .send(&out, 0)
            .map_err(KernelConntrackError::Socket)?;
        let mut selected = Vec::new();
        loop {
            let n = self
                .socket
                .recv(&mut &mut self.buf[..], 0)
                .map_err(KernelConntrackError::Socket)?;
            for msg in messages(&self.buf[..n]) {
                let msg =
                    msg.map_err(|e| KernelConntrackError::Kernel(format!("a dump message: {e}")))?;
                match msg.message_type() {
                    NLMSG_DONE => return Ok(selected),
                    NLMSG_ERROR => {
                        return match errno_of(&msg) {
                            Some(errno) => Err(KernelConntrackError::Socket(
                                std::io::Error::from_raw_os_error(errno),
                            )),
                            None => Ok(selected),
                        };
                    }
                    _ => {
                        let attrs = msg.payload().get(4..).unwrap_or_default();
                        if let (Some(orig), Some(reply)) = (
                            tuple_attr(attrs, CTA_TUPLE_ORIG),
                            tuple_attr(attrs, CTA_TUPLE_REPLY),
                        ) && keep(&orig, &reply)
                        {
                            selected.push(orig);
                        }
                    }
                }
            }
        }
    }
}

/// Applies `flows`' updates to the kernel's entries over ctnetlink, a batch of [`BATCH`]
/// requests per system call; an assured update the kernel refuses as busy goes again as an
/// expected flow's. A flow of a [`keyed_by_address`] protocol updates every kernel entry of
/// its protocol and addresses (one dump finds them), and is gone if there is none.
pub fn update(flows: &[(KernelFlow, Update)]) -> Result<Answers, KernelConntrackError> {
    let mut answers = Answers::default();
    if flows.is_empty() {
        return Ok(answers);
    }
    let mut nl = Ctnetlink::open()?;
    let mut reqs = Vec::with_capacity(flows.len());
    let mut by_address = std::collections::HashMap::new();
    for (i, (f, update)) in flows.iter().enumerate() {
        if keyed_by_address(f.proto) {
            by_address.insert((f.proto, f.src, f.dst), i);
        } else {
            reqs.push(Request {
                tuple: tuple_of(f),
                update: *update,
                flow: i,
            });
        }
    }
    // Updates of entries a dump found are not ended by an `ENOENT`: the entry went between
    // the dump and the update, others of the flow may be there.
    let direct = reqs.len();
    if !by_address.is_empty() {
        let key_of = |t: &[Tuple]| {
            let a = addrs(t);
            Some((proto_of(t)?, a.src?, a.dst?))
        };
        let found = nl.dump(|orig, _| key_of(orig).is_some_and(|k| by_address.contains_key(&k)))?;
        let mut kept = HashSet::new();
        for tuple in found {
            if let Some(&i) = key_of(&tuple).and_then(|k| by_address.get(&k)) {
                kept.insert(i);
                reqs.push(Request {
                    tuple,
                    update: flows[i].1,
                    flow: i,
                });
            }
        }
        answers
            .gone
            .extend(by_address.values().filter(|i| !kept.contains(*i)));
    }
    let first: Vec<(usize, bool)> = (0..reqs.len()).map(|r| (r, false)).collect();
    let mut errors = Vec::new();
    for batch in first.chunks(BATCH) {
        nl.send(&reqs, batch, &mut answers, &mut errors)?;
    }
    let mut again = Vec::new();
    let refused = |answers: &mut Answers, r: usize, errno: i32| {
        answers.refused += 1;
        if answers.first_refusal.is_none() {
            answers.first_refusal = Some((flows[reqs[r].flow].0, errno));
        }
    };
    for (r, errno) in errors.drain(..) {
        match errno {
            libc::ENOENT if r < direct => answers.gone.push(reqs[r].flow),
            libc::ENOENT => {}
            libc::EBUSY if matches!(reqs[r].update, Update::Refresh { assured: true, .. }) => {
                again.push((r, true))
            }
            _ => refused(&mut answers, r, errno),
        }
    }
    for batch in again.chunks(BATCH) {
        nl.send(&reqs, batch, &mut answers, &mut errors)?;
    }
    for (r, errno) in errors {
        match errno {
            libc::ENOENT if r < direct => answers.gone.push(reqs[r].flow),
            libc::ENOENT => {}
            _ => refused(&mut answers, r, errno),
        }
    }
    answers.gone.sort_unstable();
    answers.gone.dedup();
    Ok(answers)
}

/// The kernel's IPv4 entries a deletion selects: by original source, original destination or
/// reply destination (what `conntrack -D --orig-src/--orig-dst/--reply-dst` select).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Selection {
    pub orig_src: HashSet<Ipv4Addr>,
    pub orig_dst: HashSet<Ipv4Addr>,
    pub reply_dst: HashSet<Ipv4Addr>,
}

impl Selection {
    fn selects(&self, orig: &Addrs, reply: &Addrs) -> bool {
        orig.src.is_some_and(|a| self.orig_src.contains(&a))
            || orig.dst.is_some_and(|a| self.orig_dst.contains(&a))
            || reply.dst.is_some_and(|a| self.reply_dst.contains(&a))
    }

    pub fn is_empty(&self) -> bool {
        self.orig_src.is_empty() && self.orig_dst.is_empty() && self.reply_dst.is_empty()
    }
}

/// A tuple's IPv4 addresses.
#[derive(Debug, Default)]
struct Addrs {
    src: Option<Ipv4Addr>,
    dst: Option<Ipv4Addr>,
}

fn addrs(tuple: &[Tuple]) -> Addrs {
    let mut a = Addrs::default();
    for t in tuple {
        if let Tuple::Ip(ips) = t {
            for ip in ips {
                match ip {
                    IPTuple::SourceAddress(std::net::IpAddr::V4(v)) => a.src = Some(*v),
                    IPTuple::DestinationAddress(std::net::IpAddr::V4(v)) => a.dst = Some(*v),
                    _ => {}
                }
            }
        }
    }
    a
}

/// A tuple's protocol number.
fn proto_of(tuple: &[Tuple]) -> Option<u8> {
    tuple.iter().find_map(|t| match t {
        Tuple::Proto(ps) => ps.iter().find_map(|p| match p {
            ProtoTuple::Protocol(p) => Some(u8::from(*p)),
            _ => None,
        }),
        _ => None,
    })
}

/// The nested tuple attribute `kind` (`CTA_TUPLE_ORIG`, `CTA_TUPLE_REPLY`) among `attrs`.
fn tuple_attr(attrs: &[u8], kind: u16) -> Option<Vec<Tuple>> {
    let nla = NlasIterator::new(attrs)
        .filter_map(Result::ok)
        .find(|a| a.kind() & NLA_TYPE_MASK == kind)?;
    NlasIterator::new(nla.value())
        .map(|t| t.ok().and_then(|t| Tuple::parse(&t).ok()))
        .collect()
}

/// Deletes the kernel's IPv4 entries `sel` selects: one dump of the kernel's table, then one
/// delete per selected entry by its original tuple as the dump gave it, [`BATCH`] per system
/// call. Returns how many went (an entry that ended meanwhile is not counted).
pub fn delete(sel: &Selection) -> Result<usize, KernelConntrackError> {
    if sel.is_empty() {
        return Ok(0);
    }
    let mut nl = Ctnetlink::open()?;
    let selected = nl.dump(|orig, reply| sel.selects(&addrs(orig), &addrs(reply)))?;
    let mut answers = Answers::default();
    let mut errors = Vec::new();
    let mut sent = 0;
    for batch in selected.chunks(BATCH) {
        let msgs = batch.iter().enumerate().map(|(i, tuple)| {
            message(
                ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(tuple.clone())]),
                (sent + i) as u32 + 1,
                NLM_F_REQUEST,
            )
        });
        nl.send_messages(msgs, selected.len(), &mut answers, &mut errors)?;
        sent += batch.len();
    }
    let failed = errors.iter().filter(|(_, e)| *e != libc::ENOENT).count();
    if let Some((_, errno)) = errors.iter().find(|(_, e)| *e != libc::ENOENT) {
        return Err(KernelConntrackError::Kernel(format!(
            "the kernel refused {failed} of {} deletions: {}",
            selected.len(),
            std::io::Error::from_raw_os_error(*errno)
        )));
    }
    Ok(selected.len() - errors.len())
}

/// `NFNLGRP_CONNTRACK_DESTROY`: the multicast group of the kernel's conntrack destroy events.
const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;
/// `CTA_TUPLE_ORIG`, `CTA_TUPLE_REPLY` (`linux/netfilter/nfnetlink_conntrack.h`).
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
/// `nlattr`'s type bits (`NLA_TYPE_MASK`): without the nested and byte-order flags.
const NLA_TYPE_MASK: u16 = 0x3fff;
/// The receive buffer asked for the events: a burst of ends (a flush) overruns it, and the
/// rounds find the flows whose events were lost.
const ENDED_RCVBUF: usize = 1 << 20;

/// The kernel's conntrack destroy events, subscribed to: how `--policy kernel` learns at once
/// that the kernel ended a flow (timed out, closed, deleted with `conntrack -D`) instead of
/// at the next round. The kernel sends them for entries made while a listener was there
/// (`net.netfilter.nf_conntrack_events` 2, the default; none with 0): the rounds still find
/// the others, and those whose events were lost.
pub struct Ended {
    socket: Socket,
    buf: Vec<u8>,
}

impl std::os::fd::AsRawFd for Ended {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.socket.as_raw_fd()
    }
}

impl Ended {
    /// Subscribes (non-blocking: read when the socket is readable).
    pub fn subscribe() -> Result<Self, KernelConntrackError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(KernelConntrackError::Socket)?;
        socket.bind_auto().map_err(KernelConntrackError::Socket)?;
        socket
            .add_membership(NFNLGRP_CONNTRACK_DESTROY)
            .map_err(KernelConntrackError::Socket)?;
        socket
            .set_non_blocking(true)
            .map_err(KernelConntrackError::Socket)?;
        // Capped by `net.core.rmem_max`; the default buffer also works, with more bursts lost.
        let _ = socket.set_rx_buf_sz(ENDED_RCVBUF);
        Ok(Self {
            socket,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Reads every event queued, adding the IPv4 flows they name (original tuples) to
    /// `out`; returns whether events were lost since the last read (the receive buffer
    /// overran).
    pub fn read(&mut self, out: &mut Vec<KernelFlow>) -> Result<bool, KernelConntrackError> {
        let mut lost = false;
        loop {
            let n = match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(lost),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    lost = true;
                    continue;
                }
                Err(e) => return Err(KernelConntrackError::Socket(e)),
            };
            out.extend(ended_flows(&self.buf[..n]));
        }
    }
}

/// The flows the destroy events in `datagram` name: IPv4 ones, by their original tuples. An
/// event that cannot be read is skipped (the rounds find its flow).
fn ended_flows(datagram: &[u8]) -> Vec<KernelFlow> {
    let delete = (u16::from(u8::from(NetfilterSubsystem::Conntrack)) << 8)
        | u16::from(u8::from(ConntrackMessageType::Delete));
    messages(datagram)
        .map_while(Result::ok)
        .filter(|msg| msg.message_type() == delete)
        .filter_map(|msg| {
            // nfgenmsg: the family first (AF_INET), then the attributes.
            let payload = msg.payload();
            (payload.len() >= 4 && payload[0] == u8::from(NetfilterProtoFamily::IPv4))
                .then(|| orig_tuple(&payload[4..]))?
        })
        .collect()
}

/// The flow of the `CTA_TUPLE_ORIG` among `attrs` (an event's attributes).
fn orig_tuple(attrs: &[u8]) -> Option<KernelFlow> {
    let orig = tuple_attr(attrs, CTA_TUPLE_ORIG)?;
    let proto = proto_of(&orig)?;
    // One fast-path flow stands for many kernel entries of these: the rounds judge it.
    if keyed_by_address(proto) {
        return None;
    }
    let (mut sport, mut dport, mut icmp_id, mut icmp_type) = (None, None, None, None);
    let parts = orig.iter().filter_map(|t| match t {
        Tuple::Proto(ps) => Some(ps),
        _ => None,
    });
    for p in parts.flatten() {
        match p {
            ProtoTuple::SourcePort(v) => sport = Some(*v),
            ProtoTuple::DestinationPort(v) => dport = Some(*v),
            ProtoTuple::Other(nla) => {
                let mut v = [0u8; 2];
                match (nla.kind(), nla.value_len()) {
                    (CTA_PROTO_ICMP_ID, 2) => {
                        nla.emit_value(&mut v);
                        icmp_id = Some(u16::from_be_bytes(v));
                    }
                    (CTA_PROTO_ICMP_TYPE, 1) => {
                        nla.emit_value(&mut v[..1]);
                        icmp_type = Some(u16::from(v[0]));
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    // As [`tuple_of`] writes them: ports, or an echo's identifier and type.
    let (sport, dport) = match proto {
        6 | 17 | 33 | 136 => (sport?, dport?),
        1 => (icmp_id?, icmp_type?),
        _ => (0, 0),
    };
    let a = addrs(&orig);
    Some(KernelFlow {
        proto,
        src: a.src?,
        dst: a.dst?,
        sport,
        dport,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `test` on a thread of its own moved into a new network namespace (gone with the
    /// thread), so that the kernel's connection table it sees is its own.
    fn in_own_netns(test: impl FnOnce() + Send + 'static) {
        let run = std::thread::spawn(|| {
            // SAFETY: moves this thread alone into a new network namespace.
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "unshare: {}", std::io::Error::last_os_error());
            test();
        });
        if let Err(e) = run.join() {
            std::panic::resume_unwind(e);
        }
    }

    /// The conntrack tool's output, in the calling thread's network namespace.
    fn conntrack(args: &str) -> String {
        let out = std::process::Command::new("conntrack")
            .args(args.split_whitespace())
            .output()
            .expect("the conntrack tool");
        assert!(out.status.success(), "conntrack {args}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn takes_the_kernels_timeouts() {
        let dir = std::env::temp_dir().join(format!("kct-timeouts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("nf_conntrack_udp_timeout_stream"), "10\n").unwrap();
        std::fs::write(dir.join("nf_conntrack_udp_timeout"), "30\n").unwrap();
        std::fs::write(dir.join("nf_conntrack_icmp_timeout"), "junk\n").unwrap();
        let defaults = Timeout::ALL.map(|t| t.default_secs() * 1_000_000_000);
        let (t, changed) = kernel_timeouts_at(&dir, defaults);
        assert_eq!(changed, [("udp_replied", 10)]);
        assert_eq!(t[Timeout::UdpReplied as usize], 10_000_000_000);
        assert_eq!(t[Timeout::UdpUnreplied as usize], 30_000_000_000);
        assert_eq!(t[Timeout::Icmp as usize], defaults[Timeout::Icmp as usize]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn makes_tcp_tracking_liberal_once() {
        let dir = std::env::temp_dir().join(format!("kct-liberal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("nf_conntrack_tcp_be_liberal");
        std::fs::write(&path, "0\n").unwrap();
        assert!(make_liberal_at(&path).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), "1");
        assert!(!make_liberal_at(&path).unwrap());
        let missing = make_liberal_at(&dir.join("absent"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("absent (is nf_conntrack loaded?)"),
            "{missing}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The requests' bytes: `nlmsghdr`, `nfgenmsg` and the attributes in the order and
    /// encoding `linux/netfilter/nfnetlink_conntrack.h` gives them.
    #[test]
    fn writes_the_updates_ctnetlink_reads() {
        let udp = KernelFlow {
            proto: 17,
            src: Ipv4Addr::new(10, 0, 0, 10),
            dst: Ipv4Addr::new(192, 0, 2, 7),
            sport: 5353,
            dport: 53,
        };
        let bytes = |f: &KernelFlow, u: Update, expected: bool| {
            let m = request(&tuple_of(f), u, expected, 9);
            let mut b = vec![0; m.buffer_len()];
            m.serialize(&mut b);
            b
        };
        let tuple: Vec<u8> = [
            &[52, 0, 1, 0x80][..],           // CTA_TUPLE_ORIG, nested
            &[20, 0, 1, 0x80],               // CTA_TUPLE_IP
            &[8, 0, 1, 0, 10, 0, 0, 10],     // CTA_IP_V4_SRC
            &[8, 0, 2, 0, 192, 0, 2, 7],     // CTA_IP_V4_DST
            &[28, 0, 2, 0x80],               // CTA_TUPLE_PROTO
            &[5, 0, 1, 0, 17, 0, 0, 0],      // CTA_PROTO_NUM
            &[6, 0, 2, 0, 0x14, 0xe9, 0, 0], // CTA_PROTO_SRC_PORT 5353
            &[6, 0, 3, 0, 0, 53, 0, 0],      // CTA_PROTO_DST_PORT 53
        ]
        .concat();
        let head = |len: u8| -> Vec<u8> {
            [
                &[len, 0, 0, 0][..],       // length
                &[0, 1, 1, 0],             // CTNETLINK << 8 | CT_NEW; NLM_F_REQUEST
                &[9, 0, 0, 0, 0, 0, 0, 0], // sequence 9, port 0
                &[2, 0, 0, 0],             // AF_INET, version 0, res_id 0
            ]
            .concat()
        };
        assert_eq!(
            bytes(&udp, Update::Probe, false),
            [head(72), tuple.clone()].concat()
        );
        let refresh = Update::Refresh {
            secs: 120,
            assured: false,
        };
        assert_eq!(
            bytes(&udp, refresh, false),
            [head(80), tuple.clone(), vec![8, 0, 7, 0, 0, 0, 0, 120]].concat()
        );
        let assured = Update::Refresh {
            secs: 0,
            assured: true,
        };
        let status = |bits: u8| vec![8, 0, 3, 0, 0, 0, 0, bits];
        assert_eq!(
            bytes(&udp, assured, false),
            [
                head(88),
                tuple.clone(),
                vec![8, 0, 7, 0, 0, 0, 0, 1],
                status(0b1110)
            ]
            .concat(),
            "at least a second; confirmed, seen reply, assured"
        );
        assert_eq!(
            bytes(&udp, assured, true),
            [
                head(88),
                tuple,
                vec![8, 0, 7, 0, 0, 0, 0, 1],
                status(0b1111)
            ]
            .concat(),
            "and expected"
        );
        let echo = KernelFlow {
            proto: 1,
            sport: 77,
            dport: 8,
            ..udp
        };
        let icmp = bytes(&echo, Update::Probe, false);
        assert_eq!(
            &icmp[48..],
            [
                &[5, 0, 1, 0, 1, 0, 0, 0][..], // CTA_PROTO_NUM
                &[6, 0, 4, 0, 0, 77, 0, 0],    // CTA_PROTO_ICMP_ID
                &[5, 0, 5, 0, 8, 0, 0, 0],     // CTA_PROTO_ICMP_TYPE
                &[5, 0, 6, 0, 0, 0, 0, 0],     // CTA_PROTO_ICMP_CODE
            ]
            .concat()
        );
    }

    /// Against the kernel, in a network namespace of the test's own thread (gone with it):
    /// entries made with the conntrack tool get the timeouts and the assured mark the
    /// updates carry, a probe changes nothing, and the flows the kernel does not have (more
    /// than a batch of them, and one deleted between two rounds) come back as gone. Needs
    /// root and `nf_conntrack`, as natd `--policy kernel`.
    #[test]
    fn updates_the_kernels_entries_and_finds_the_ended_ones() {
        in_own_netns(|| {
            let flow = |proto, last: u8, sport, dport| KernelFlow {
                proto,
                src: Ipv4Addr::new(10, 0, 0, last),
                dst: Ipv4Addr::new(192, 0, 2, 7),
                sport,
                dport,
            };
            conntrack("-I -p udp -s 10.0.0.10 -d 192.0.2.7 --sport 5353 --dport 53 -t 100");
            conntrack(
                "-I -p icmp -s 10.0.0.10 -d 192.0.2.7 --icmp-type 8 --icmp-code 0 --icmp-id 77 -t 100",
            );
            conntrack(
                "-I -p udp -s 10.0.0.11 -d 192.0.2.7 --sport 5353 --dport 53 -t 100 -u SEEN_REPLY,ASSURED",
            );
            let mut flows = vec![
                (
                    flow(17, 10, 5353, 53),
                    Update::Refresh {
                        secs: 7,
                        assured: true,
                    },
                ),
                (
                    flow(1, 10, 77, 8),
                    Update::Refresh {
                        secs: 5,
                        assured: false,
                    },
                ),
                (flow(17, 11, 5353, 53), Update::Probe),
            ];
            for p in 0..(3 * BATCH as u16 + 5) {
                let u = if p % 2 == 0 {
                    Update::Probe
                } else {
                    Update::Refresh {
                        secs: 9,
                        assured: true,
                    }
                };
                flows.push((flow(6, 12, 1000 + p, 80), u));
            }
            let answers = update(&flows).expect("ctnetlink");
            assert_eq!(answers.gone, (3..flows.len()).collect::<Vec<_>>());
            assert_eq!((answers.refused, answers.lost), (0, false), "{answers:?}");
            // `proto number timeout ...`: the timeout and the line of the entry from `src`
            // with `what` (`sport=5353` or `id=77`).
            let listed = conntrack("-L");
            let entry = |src: &str, what: &str| -> (u64, &str) {
                let line = listed
                    .lines()
                    .find(|l| l.contains(&format!("src={src} ")) && l.contains(what))
                    .unwrap_or_else(|| panic!("no entry of {src} {what} in {listed}"));
                let t = line.split_whitespace().nth(2).and_then(|t| t.parse().ok());
                (t.unwrap_or_else(|| panic!("no timeout in {line}")), line)
            };
            let (t, line) = entry("10.0.0.10", "sport=5353");
            assert!(
                t <= 7 && line.contains("[ASSURED]") && !line.contains("[UNREPLIED]"),
                "{line}"
            );
            let (t, line) = entry("10.0.0.10", "id=77");
            assert!(t <= 5 && !line.contains("[ASSURED]"), "{line}");
            let (t, line) = entry("10.0.0.11", "sport=5353");
            assert!(
                t > 9 && line.contains("[ASSURED]"),
                "a probe changed it: {line}"
            );
            conntrack("-D -p icmp -s 10.0.0.10");
            let answers = update(&flows[..3]).expect("ctnetlink");
            assert_eq!(answers.gone, [1], "{answers:?}");
        });
    }

    /// SCTP and GRE, which the fast path keys by addresses alone: a flow's update reaches
    /// every kernel entry of its protocol and addresses (two SCTP associations, a GRE
    /// tunnel), a flow with none is gone, and their destroy events name no flow (one fast-path
    /// flow stands for all of them: the rounds judge it).
    #[test]
    fn flows_keyed_by_address_update_every_entry_of_their_addresses() {
        in_own_netns(|| {
            let mut ended = Ended::subscribe().expect("subscribing");
            let sctp = "-I -p sctp -s 10.0.0.10 -d 192.0.2.7 --state ESTABLISHED -t 100";
            conntrack(&format!(
                "{sctp} --sport 2905 --dport 2905 --orig-vtag 1 --reply-vtag 2"
            ));
            conntrack(&format!(
                "{sctp} --sport 3868 --dport 3868 --orig-vtag 3 --reply-vtag 4"
            ));
            conntrack("-I -p gre -s 10.0.0.10 -d 192.0.2.7 --srckey 0 --dstkey 0 -t 100");
            let flow = |proto, last| KernelFlow {
                proto,
                src: Ipv4Addr::new(10, 0, 0, last),
                dst: Ipv4Addr::new(192, 0, 2, 7),
                sport: 0,
                dport: 0,
            };
            let refresh = Update::Refresh {
                secs: 7,
                assured: true,
            };
            let flows = [
                (flow(132, 10), refresh),
                (flow(47, 10), refresh),
                (flow(132, 11), Update::Probe),
            ];
            let answers = update(&flows).expect("ctnetlink");
            assert_eq!(answers.gone, [2], "{answers:?}");
            assert_eq!((answers.refused, answers.lost), (0, false), "{answers:?}");
            let listed = conntrack("-L");
            assert_eq!(listed.lines().count(), 3, "{listed}");
            for line in listed.lines() {
                let t: Option<u64> = line.split_whitespace().nth(2).and_then(|t| t.parse().ok());
                assert!(
                    t.is_some_and(|t| t <= 7) && line.contains("[ASSURED]"),
                    "{line}"
                );
            }
            conntrack("-D -s 10.0.0.10");
            let mut got = Vec::new();
            assert_eq!(ended.read(&mut got).ok(), Some(false));
            assert!(got.is_empty(), "{got:?}");
        });
    }

    /// Against the kernel, in a network namespace of the test's own thread: the destroy
    /// events of entries deleted with the conntrack tool name their flows as the fast path
    /// keys them (UDP ports, an echo's identifier and type); nothing is queued before.
    #[test]
    fn the_kernels_destroy_events_name_the_flows_it_ended() {
        in_own_netns(|| {
            let mut ended = Ended::subscribe().expect("subscribing");
            conntrack("-I -p udp -s 10.0.0.10 -d 192.0.2.7 --sport 5353 --dport 53 -t 100");
            conntrack(
                "-I -p icmp -s 10.0.0.10 -d 192.0.2.7 --icmp-type 8 --icmp-code 0 --icmp-id 77 -t 100",
            );
            let mut got = Vec::new();
            assert_eq!(ended.read(&mut got).ok(), Some(false));
            assert!(got.is_empty(), "events before any end: {got:?}");
            conntrack("-D -s 10.0.0.10");
            assert_eq!(ended.read(&mut got).ok(), Some(false));
            got.sort_by_key(|f| f.proto);
            let flow = |proto, sport, dport| KernelFlow {
                proto,
                src: Ipv4Addr::new(10, 0, 0, 10),
                dst: Ipv4Addr::new(192, 0, 2, 7),
                sport,
                dport,
            };
            assert_eq!(got, [flow(1, 77, 8), flow(17, 5353, 53)]);
        });
    }

    /// Against the kernel, in a network namespace of the test's own thread: a deletion takes
    /// the entries its selection names (an outbound flow by its original source, an inbound
    /// one by its original destination, a flow SNATed to a public IP by its reply
    /// destination) and leaves every other; an empty selection deletes nothing.
    #[test]
    fn deletes_the_kernels_entries_a_selection_names() {
        in_own_netns(|| {
            let udp = "-p udp --sport 5000 --dport 53 -t 100";
            // Outbound from V 10.0.0.10; inbound to P 203.0.113.10; SNATed to P; another V's.
            conntrack(&format!("-I -s 10.0.0.10 -d 192.0.2.7 {udp}"));
            conntrack(&format!("-I -s 198.51.100.2 -d 203.0.113.10 {udp}"));
            conntrack(&format!(
                "-I -s 10.0.0.12 -d 192.0.2.7 {udp} -r 192.0.2.7 -q 203.0.113.10 \
                 --reply-port-src 53 --reply-port-dst 5000"
            ));
            conntrack(&format!("-I -s 10.0.0.11 -d 192.0.2.7 {udp}"));
            let ip = |s: &str| s.parse::<Ipv4Addr>().expect("an address");
            let left = || -> Vec<String> {
                let mut l: Vec<String> = conntrack("-L")
                    .lines()
                    .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("src=")))
                    .map(str::to_string)
                    .collect();
                l.sort();
                l
            };
            assert_eq!(delete(&Selection::default()).ok(), Some(0));
            let mapping = Selection {
                orig_src: [ip("10.0.0.10")].into(),
                orig_dst: [ip("203.0.113.10")].into(),
                ..Selection::default()
            };
            assert_eq!(delete(&mapping).ok(), Some(2));
            assert_eq!(left(), ["src=10.0.0.11", "src=10.0.0.12"]);
            let public = Selection {
                orig_dst: [ip("203.0.113.10")].into(),
                reply_dst: [ip("203.0.113.10")].into(),
                ..Selection::default()
            };
            assert_eq!(delete(&public).ok(), Some(1));
            assert_eq!(left(), ["src=10.0.0.11"]);
        });
    }
}
