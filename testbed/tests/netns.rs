//! Namespaces and topology guards against the real kernel (needs root): created, usable,
//! gone after drop also when a panic unwinds, the thread restored, stale ones swept.
use std::path::Path;

use nat_testbed::{
    EnteredNetns, Netns, mac_str,
    netns::sweep_stale,
    topology::{GUEST_ADDR, HOST_IF, ROUTER_PUBLIC_IF, ThreeNamespaces},
    unique_stem,
};

const PREFIX: &str = "xsn-tb-";

fn exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn thread_netns() -> std::path::PathBuf {
    std::fs::read_link("/proc/thread-self/ns/net").unwrap_or_default()
}

#[test]
fn a_namespace_lives_as_long_as_its_guard() {
    let ns = Netns::create(unique_stem(PREFIX)).unwrap();
    let name = ns.name().to_string();
    assert!(exists(&name));
    ns.ip(&["link", "add", "tb0", "type", "veth", "peer", "name", "tb1"])
        .unwrap();
    let (ifindex, mac) = ns.link("tb0").unwrap();
    let links = ns.links().unwrap();
    let tb0 = links.iter().find(|l| l.name == "tb0").unwrap();
    assert_eq!((tb0.ifindex, tb0.mac), (ifindex, mac));
    assert_eq!(ns.mac("tb0").unwrap(), mac_str(mac));
    ns.ip_batch("addr add 192.0.2.1/24 dev tb0\nlink set tb0 up\n")
        .unwrap();
    let addrs = ns.ipv4_addrs("tb0").unwrap();
    assert_eq!(addrs.len(), 1);
    assert_eq!(addrs[0].addr.to_string(), "192.0.2.1");
    // The closure runs on a thread inside the namespace, not in this thread's.
    let inside = ns.run(thread_netns).unwrap();
    assert_ne!(inside, thread_netns());
    assert!(ns.ip_counter("InReceives").is_ok());
    drop(ns);
    assert!(!exists(&name));
}

#[test]
fn a_failing_batch_quotes_its_script() {
    let ns = Netns::create(unique_stem(PREFIX)).unwrap();
    let e = ns.ip_batch("link set nosuchdev up\n").unwrap_err();
    assert!(format!("{e:#}").contains("link set nosuchdev up"), "{e:#}");
}

#[test]
fn a_panic_while_the_guard_lives_deletes_the_namespace() {
    let name = unique_stem(PREFIX);
    let n = name.clone();
    let r = std::thread::spawn(move || {
        let _ns = Netns::create(n).unwrap();
        panic!("test failure");
    })
    .join();
    assert!(r.is_err());
    assert!(!exists(&name));
}

#[test]
fn an_entered_namespace_is_left_and_deleted_on_drop() {
    let before = thread_netns();
    let ns = EnteredNetns::create(unique_stem(PREFIX)).unwrap();
    let name = ns.name().to_string();
    assert_ne!(thread_netns(), before);
    drop(ns);
    assert_eq!(thread_netns(), before);
    assert!(!exists(&name));
}

#[test]
fn sweep_removes_only_namespaces_of_dead_processes_with_the_prefix() {
    // A pid beyond pid_max is never alive.
    let dead = Netns::create(format!("{PREFIX}sweep-4194305-0")).unwrap();
    let ours = Netns::create(unique_stem(&format!("{PREFIX}sweep-"))).unwrap();
    let removed = sweep_stale(&format!("{PREFIX}sweep-"));
    assert_eq!(removed, vec![dead.name().to_string()]);
    assert!(!exists(dead.name()) && exists(ours.name()));
    // Dropping a guard whose namespace is already gone only reports it.
    drop(dead);
}

#[test]
fn the_three_namespaces_are_wired() {
    let prefix = format!("{}-", unique_stem(PREFIX));
    let t = ThreeNamespaces::create(&prefix).unwrap();
    assert_eq!(t.router.name(), format!("{prefix}router"));
    t.router.link(ROUTER_PUBLIC_IF).unwrap();
    t.guest.link(HOST_IF).unwrap();
    let g = GUEST_ADDR.to_string();
    t.router
        .exec("ping", &["-n", "-q", "-c", "1", "-W", "5", &g])
        .unwrap();
    let names = [t.client.name(), t.router.name(), t.guest.name()].map(str::to_string);
    drop(t);
    assert!(names.iter().all(|n| !exists(n)));
}
