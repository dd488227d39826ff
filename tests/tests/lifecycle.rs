//! natd's lifecycle driven in-process through the library's `service::Natd`, without
//! spawning natd: start, serve, stop leaving the fast path, adoption by the next start, stop
//! detaching it; a start that fails before installing anything and one that fails after
//! attaching leave nothing behind, and an adopted fast path survives a failed start.
//!
//! Each test runs natd on its own thread, entered into a namespace of its own (`NetnsGuard`)
//! with a current-thread runtime, so everything natd does (netlink, nft, sysctls, the
//! programs it spawns) happens in that namespace. What is checked is observed from outside
//! natd: the interfaces' XDP programs (`ip -d link`), the pins in bpffs, the nftables table,
//! the control socket's answers.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, ensure};
use nat_tests::netns::NetnsGuard;
use nat_userspace::{
    api::{Reply, Request, Response},
    service::{Exit, Natd, Options, StartError},
};

const PUBLIC_IF: &str = "xpub0";
const GUEST_IF: &str = "xgst0";
const MAPPING: &str = "[[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.10\"\n";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A namespace with a public and a guest veth, and the directories one natd uses; all removed
/// on drop.
struct Bed {
    ns: NetnsGuard,
    dir: PathBuf,
    bpffs: PathBuf,
}

impl Bed {
    fn new() -> anyhow::Result<Self> {
        let ns = NetnsGuard::new()?;
        ns.ip_batch(&format!(
            "link set lo up\n\
             link add {PUBLIC_IF} type veth peer name xpub1\n\
             link add {GUEST_IF} type veth peer name xgst1\n\
             addr add 203.0.113.1/24 dev {PUBLIC_IF}\n\
             addr add 10.0.0.1/24 dev {GUEST_IF}\n\
             link set {PUBLIC_IF} up\nlink set xpub1 up\n\
             link set {GUEST_IF} up\nlink set xgst1 up\n"
        ))?;
        let n = format!(
            "{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(format!("xsn-life-{n}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("natd.toml"), MAPPING)?;
        Ok(Self {
            ns,
            dir,
            bpffs: PathBuf::from(format!("/sys/fs/bpf/xsn-life-{n}")),
        })
    }

    fn options(&self) -> Options {
        let mut o = Options::new(vec![PUBLIC_IF.into()], vec![GUEST_IF.into()]);
        o.socket = self.dir.join("natd.sock");
        o.state_dir = self.dir.join("state");
        o.config = Some(self.dir.join("natd.toml"));
        o.bpffs = self.bpffs.clone();
        o.metrics_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        o
    }

    /// The id of the XDP program on `iface`, if any.
    fn xdp_prog(&self, iface: &str) -> anyhow::Result<Option<u64>> {
        let out = self.ns.ip(&["-d", "-j", "link", "show", "dev", iface])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v[0]["xdp"]["prog"]["id"].as_u64())
    }

    /// The pinned maps' names.
    fn pins(&self) -> Vec<String> {
        std::fs::read_dir(self.bpffs.join("maps"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether natd's nftables table exists in the namespace.
    fn nft_table(&self) -> bool {
        self.ns
            .exec(
                "nft",
                &["list", "table", "ip", nat_userspace::netfilter::TABLE],
            )
            .is_ok()
    }

    /// Nothing of a natd is left: no program on either interface, no pins, no table, no
    /// socket.
    fn nothing_left(&self) -> anyhow::Result<()> {
        for iface in [PUBLIC_IF, GUEST_IF] {
            let prog = self.xdp_prog(iface)?;
            ensure!(prog.is_none(), "XDP program {prog:?} left on {iface}");
        }
        ensure!(self.pins().is_empty(), "pins left: {:?}", self.pins());
        ensure!(!self.nft_table(), "the nftables table was left");
        ensure!(
            !self.dir.join("natd.sock").exists(),
            "the control socket was left"
        );
        Ok(())
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.bpffs);
    }
}

/// Runs `test` on a thread of its own with a current-thread runtime (natd's tasks and every
/// thread they spawn stay in the bed's namespace).
fn in_bed<F>(test: F) -> anyhow::Result<()>
where
    F: AsyncFnOnce(&Bed) -> anyhow::Result<()> + Send + 'static,
{
    std::thread::spawn(move || {
        let bed = Bed::new()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(test(&bed))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the test thread panicked"))?
}

/// natd's status over its control socket.
async fn status(socket: &Path) -> anyhow::Result<nat_userspace::api::StatusReport> {
    let socket = socket.to_path_buf();
    let reply = tokio::task::spawn_blocking(move || {
        nat_userspace::api::client::call(&socket, &Request::Status)
    })
    .await??;
    match reply {
        Response::Ok(Reply::Status(s)) => Ok(s),
        other => anyhow::bail!("status answered {other:?}"),
    }
}

#[test]
fn a_stopped_natd_leaves_the_fast_path_to_the_next_which_detaches_it() -> anyhow::Result<()> {
    in_bed(async |bed: &Bed| {
        let natd = Natd::start(bed.options()).await.context("first start")?;
        let s = status(natd.socket()).await?;
        ensure!(s.mappings == 1, "{} mappings installed", s.mappings);
        ensure!(
            s.interfaces.iter().all(|a| !a.adopted) && s.interfaces.len() == 2,
            "attachments {:?}",
            s.interfaces
        );
        let first = bed
            .xdp_prog(PUBLIC_IF)?
            .context("no XDP program on the public side")?;
        ensure!(bed.nft_table(), "no nftables table");
        ensure!(!bed.pins().is_empty(), "no pins");
        let metrics = natd.metrics_addr();
        ensure!(metrics.port() != 0, "metrics on port 0");
        natd.stop(Exit::Leave).await?;

        ensure!(
            bed.xdp_prog(PUBLIC_IF)? == Some(first),
            "the fast path was not left running"
        );
        ensure!(bed.nft_table(), "the nftables table went with Exit::Leave");
        ensure!(!bed.dir.join("natd.sock").exists(), "the socket was left");

        let natd = Natd::start(bed.options()).await.context("second start")?;
        let s = status(natd.socket()).await?;
        ensure!(s.mappings == 1, "{} mappings after adoption", s.mappings);
        ensure!(
            s.interfaces.iter().all(|a| a.adopted),
            "the next natd did not adopt: {:?}",
            s.interfaces
        );
        natd.stop(Exit::Detach).await?;
        bed.nothing_left()
    })
}

#[test]
fn a_start_failing_after_attaching_leaves_nothing() -> anyhow::Result<()> {
    in_bed(async |bed: &Bed| {
        // The mapping's public IP is in no public interface's subnet: with managed addresses
        // installing it fails, after the interfaces were attached.
        std::fs::write(
            bed.dir.join("natd.toml"),
            "[[mapping]]\npublic = \"198.51.100.10\"\nprivate = \"10.0.0.10\"\n",
        )?;
        let mut o = bed.options();
        o.manage_addresses = true;
        match Natd::start(o).await {
            Err(StartError::Install(_)) => {}
            Err(e) => anyhow::bail!("failed otherwise: {e}"),
            Ok(natd) => {
                natd.stop(Exit::Detach).await?;
                anyhow::bail!("started with an address it cannot place");
            }
        }
        bed.nothing_left()
    })
}

#[test]
fn a_taken_metrics_address_changes_nothing() -> anyhow::Result<()> {
    in_bed(async |bed: &Bed| {
        let taken = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let mut o = bed.options();
        o.metrics_addr = taken.local_addr()?;
        match Natd::start(o).await {
            Err(StartError::MetricsAddress { addr, .. }) => {
                ensure!(addr == taken.local_addr()?, "the error names {addr}")
            }
            Err(e) => anyhow::bail!("failed otherwise: {e}"),
            Ok(natd) => {
                natd.stop(Exit::Detach).await?;
                anyhow::bail!("started on a taken metrics address");
            }
        }
        ensure!(!bed.bpffs.exists(), "the pin directory was created");
        ensure!(
            !bed.dir.join("state").exists(),
            "the state directory was created"
        );
        bed.nothing_left()
    })
}

#[test]
fn a_failed_start_keeps_an_adopted_fast_path_running() -> anyhow::Result<()> {
    in_bed(async |bed: &Bed| {
        Natd::start(bed.options()).await?.stop(Exit::Leave).await?;
        ensure!(bed.xdp_prog(PUBLIC_IF)?.is_some(), "no XDP program left");
        let pins = bed.pins();
        // The control socket cannot be made: its directory is a file.
        std::fs::write(bed.dir.join("blocker"), b"")?;
        let mut o = bed.options();
        o.socket = bed.dir.join("blocker").join("natd.sock");
        match Natd::start(o).await {
            Err(StartError::Socket(_)) => {}
            Err(e) => anyhow::bail!("failed otherwise: {e}"),
            Ok(natd) => {
                natd.stop(Exit::Detach).await?;
                anyhow::bail!("started without a control socket");
            }
        }
        // (Its program may be the failed natd's: adoption swaps programs in place.)
        ensure!(
            bed.xdp_prog(PUBLIC_IF)?.is_some() && bed.xdp_prog(GUEST_IF)?.is_some(),
            "the adopted fast path was detached"
        );
        ensure!(bed.pins() == pins, "the pins changed: {:?}", bed.pins());
        ensure!(bed.nft_table(), "the adopted nftables table was removed");
        Natd::start(bed.options()).await?.stop(Exit::Detach).await?;
        bed.nothing_left()
    })
}
