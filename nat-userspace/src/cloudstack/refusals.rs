//! Refusals: malformed JSON, wrong payload shapes and types, invalid values, and changes the
//! state does not allow. Each names the rule and field, and leaves the caller's state as it was.
use super::{
    tests::{EGRESS, FIREWALL, STATICNAT, fw, refused, state_after},
    *,
};
use crate::state::DesiredState;

#[test]
fn refused_payload_leaves_the_original_untouched_but_the_clone_half_done() {
    let original = state_after(&[STATICNAT]);
    // Rules #1 and #2 apply, #3 is refused.
    let text = r#"{"type":"firewallrules","rules":[
        {"id":31,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"tcp","src_port_range":[80,80],"source_cidr_list":["0.0.0.0/0"]},
        {"id":32,"traffic_type":"Ingress","src_ip":"203.0.113.101","protocol":"tcp","src_port_range":[443,443],"source_cidr_list":["0.0.0.0/0"]},
        {"id":33,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"tcp","src_port_range":[1,70000]}]}"#;
    let payload = parse(text).unwrap();
    let mut clone = original.clone();
    let e = apply(&payload, &mut clone).unwrap_err();
    assert_eq!(
        e.to_string(),
        "rule #3 (id 33): src_port_range: port 70000 is outside 1-65535"
    );
    assert_eq!(
        clone.ingress_rules().count(),
        2,
        "the clone is half-modified"
    );
    assert_eq!(original.ingress_rules().count(), 0);
    assert_eq!(original, state_after(&[STATICNAT]));
    // Through the caller's pattern the state stays as it was.
    assert_eq!(
        refused(&original, text),
        "rule #3 (id 33): src_port_range: port 70000 is outside 1-65535"
    );
}

#[test]
fn malformed_json_and_payload_shapes_are_refused() {
    let s = DesiredState::default();
    let truncated = &FIREWALL[..60];
    let e = refused(&s, truncated);
    assert!(e.starts_with("malformed JSON: EOF while parsing"), "{e}");
    assert!(e.ends_with("at line 1 column 60"), "{e}");
    let e = refused(&s, "{\"type\":\"staticnatrules\",\n \"rules\":[}");
    assert!(e.ends_with("at line 2 column 11"), "{e}");
    let cases = [
        ("[]", "payload: expected a JSON object, found an array"),
        (
            r#"{"rules":[]}"#,
            r#"type: missing (expected "staticnatrules" or "firewallrules")"#,
        ),
        (
            r#"{"type":"forwardrules","rules":[]}"#,
            r#"type: "forwardrules" is not a payload type natd applies (expected "staticnatrules" or "firewallrules")"#,
        ),
        (
            r#"{"type":7}"#,
            r#"type: 7 is not a payload type natd applies (expected "staticnatrules" or "firewallrules")"#,
        ),
        (
            r#"{"type":"firewallrules","rules":{}}"#,
            "rules: expected an array of rules, found an object",
        ),
        (
            r#"{"type":"staticnatrules","rules":[{"source_ip_address":"203.0.113.1","destination_ip_address":"10.0.0.1"},5]}"#,
            "rule #2: expected a JSON object, found a number",
        ),
        (
            r#"{"type":"staticnatrules","rules":[{"revoke":"no","source_ip_address":"203.0.113.1"}]}"#,
            r#"rule #1: revoke: invalid type: string "no", expected a boolean"#,
        ),
        (
            r#"{"type":"firewallrules","rules":[{"id":11,"src_port_range":"22"}]}"#,
            r#"rule #1 (id 11): src_port_range: invalid type: string "22", expected a sequence"#,
        ),
        (
            r#"{"type":"firewallrules","rules":[{"id":"11","traffic_type":"Ingress"}]}"#,
            r#"rule #1: id: invalid type: string "11", expected u64"#,
        ),
        (
            r#"{"type":"firewallrules","rules":[{"id":11,"source_cidr_list":[1]}]}"#,
            "rule #1 (id 11): source_cidr_list: invalid type: integer `1`, expected a string",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(refused(&s, text), want, "{text}");
    }
}

#[test]
fn invalid_static_nat_rules_name_the_rule_and_field() {
    let s = state_after(&[STATICNAT]);
    let nat = |rules: &str| format!(r#"{{"type":"staticnatrules","rules":[{rules}]}}"#);
    let cases = [
        (
            nat(r#"{"revoke":false,"destination_ip_address":"10.1.1.12"}"#),
            "rule #1: source_ip_address: missing",
        ),
        (
            nat(r#"{"revoke":false,"source_ip_address":"203.0.113.102"}"#),
            "rule #1: destination_ip_address: missing",
        ),
        (
            nat(
                r#"{"source_ip_address":"203.0.113.102","destination_ip_address":"10.1.1.12"},
                   {"source_ip_address":"203.0.113.103","destination_ip_address":"10.1.1.300"}"#,
            ),
            r#"rule #2: destination_ip_address: "10.1.1.300" is not an IPv4 address"#,
        ),
        (
            nat(r#"{"revoke":true,"source_ip_address":""}"#),
            r#"rule #1: source_ip_address: "" is not an IPv4 address"#,
        ),
        (
            // Replacing the mapping of .100 (as the router's databag merge does) would map
            // 10.1.1.11 twice.
            nat(r#"{"source_ip_address":"203.0.113.100","destination_ip_address":"10.1.1.11"}"#),
            "rule #1: destination_ip_address: private IP 10.1.1.11 is already mapped to \
             another public IP: 203.0.113.101 -> 10.1.1.11",
        ),
        (
            nat(r#"{"source_ip_address":"203.0.113.102","destination_ip_address":"10.1.1.10"}"#),
            "rule #1: destination_ip_address: private IP 10.1.1.10 is already mapped to \
             another public IP: 203.0.113.100 -> 10.1.1.10",
        ),
        (
            nat(r#"{"source_ip_address":"224.0.0.1","destination_ip_address":"10.1.1.12"}"#),
            "rule #1: source_ip_address: public IP 224.0.0.1 is not a unicast IPv4 address \
             (multicast)",
        ),
        (
            nat(
                r#"{"source_ip_address":"203.0.113.102","destination_ip_address":"203.0.113.101"}"#,
            ),
            "rule #1: destination_ip_address: private IP 203.0.113.101 is already used as the \
             public address of mapping 203.0.113.101 -> 10.1.1.11",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(refused(&s, &text), want, "{text}");
    }
}

#[test]
fn invalid_firewall_rules_name_the_rule_and_field() {
    let s = state_after(&[STATICNAT, FIREWALL, EGRESS]);
    let ok12 = r#"{"id":15,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"tcp","source_cidr_list":["0.0.0.0/0"]}"#;
    let cases = [
        (
            fw(r#"{"traffic_type":"Ingress"}"#),
            "rule #1: id: missing".to_string(),
        ),
        (
            fw(r#"{"id":16,"src_ip":"203.0.113.100","protocol":"tcp"}"#),
            "rule #1 (id 16): traffic_type: missing".into(),
        ),
        (
            fw(r#"{"id":16,"traffic_type":"Sideways"}"#),
            r#"rule #1 (id 16): traffic_type: "Sideways" is not a traffic type (expected "Ingress" or "Egress")"#.into(),
        ),
        (
            // configure.py compares with 'Ingress' as Gson writes the Java enum.
            fw(r#"{"id":16,"traffic_type":"ingress","src_ip":"203.0.113.100","protocol":"tcp","source_cidr_list":["0.0.0.0/0"]}"#),
            r#"rule #1 (id 16): traffic_type: "ingress" is not a traffic type (expected "Ingress" or "Egress")"#.into(),
        ),
        (
            fw(&format!(
                r#"{ok12},{{"id":16,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"tcp","src_port_range":[1,70000]}}"#
            )),
            "rule #2 (id 16): src_port_range: port 70000 is outside 1-65535".into(),
        ),
        (
            fw(r#"{"id":16,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"udp","src_port_range":[0,10]}"#),
            "rule #1 (id 16): src_port_range: port 0 is outside 1-65535".into(),
        ),
        (
            fw(r#"{"id":16,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"tcp","src_port_range":[90,80]}"#),
            "rule #1 (id 16): src_port_range: port range 90-80 starts after it ends".into(),
        ),
        (
            fw(r#"{"id":16,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"tcp","src_port_range":[80]}"#),
            "rule #1 (id 16): src_port_range: expected [first, last], found 1 values".into(),
        ),
        (
            fw(&format!(
                r#"{ok12},{ok12},{{"id":17,"traffic_type":"Ingress","src_ip":"203.0.113.101","protocol":"icmp","source_cidr_list":["192.0.2.0/25","192.0.2.0/33"]}}"#
            )),
            r#"rule #3 (id 17): source_cidr_list[1]: "192.0.2.0/33" is not an IPv4 CIDR (expected A.B.C.D/N with N in 0..=32, or A.B.C.D)"#.into(),
        ),
        (
            fw(r#"{"id":16,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"gre"}"#),
            r#"rule #1 (id 16): protocol: "gre" is not supported in ingress rules (expected tcp, udp, icmp or all)"#.into(),
        ),
        (
            // Protocol `all` allows nothing in an ingress rule, but its fields are read.
            fw(r#"{"id":16,"traffic_type":"Ingress","protocol":"all","source_cidr_list":["0.0.0.0/0"]}"#),
            "rule #1 (id 16): src_ip: missing".into(),
        ),
        (
            fw(r#"{"id":16,"traffic_type":"Egress","protocol":"47","default_egress_policy":true}"#),
            r#"rule #1 (id 16): protocol: "47" is not supported in egress rules (expected tcp, udp, icmp or all)"#.into(),
        ),
        (
            fw(r#"{"id":16,"traffic_type":"Ingress","src_ip":"203.0.113.100"}"#),
            "rule #1 (id 16): protocol: missing".into(),
        ),
        (
            fw(r#"{"id":16,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"icmp","icmp_type":300}"#),
            "rule #1 (id 16): icmp_type: 300 is outside 0-255 (or -1 for any)".into(),
        ),
        (
            fw(r#"{"id":16,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"icmp","icmp_type":-1,"icmp_code":3}"#),
            "rule #1 (id 16): icmp_code: an icmp code needs an icmp type".into(),
        ),
        (
            fw(r#"{"id":16,"traffic_type":"Ingress","protocol":"tcp","source_cidr_list":[]}"#),
            "rule #1 (id 16): src_ip: missing".into(),
        ),
        (
            fw(r#"{"id":16,"traffic_type":"Ingress","src_ip":"","protocol":"tcp","source_cidr_list":[]}"#),
            r#"rule #1 (id 16): src_ip: "" is not an IPv4 address"#.into(),
        ),
        (
            fw(r#"{"id":23,"traffic_type":"Egress","protocol":"tcp"}"#),
            "rule #1 (id 23): default_egress_policy: missing".into(),
        ),
        (
            fw(r#"{"id":23,"traffic_type":"Egress","protocol":"tcp","default_egress_policy":true,
                   "source_cidr_list":["10.1.1.0/24","10.1.1.0/40"]}"#),
            r#"rule #1 (id 23): source_cidr_list[1]: "10.1.1.0/40" is not an IPv4 CIDR (expected A.B.C.D/N with N in 0..=32, or A.B.C.D)"#.into(),
        ),
        (
            fw(r#"{"id":1000000000000001,"traffic_type":"Egress","protocol":"tcp","default_egress_policy":true}"#),
            "rule #1 (id 1000000000000001): id: 1000000000000001 is in the range natd gives its \
             own rules (from 1000000000000000); CloudStack's ids are below it"
                .into(),
        ),
        (
            fw(r#"{"id":23,"traffic_type":"Egress","protocol":"tcp","default_egress_policy":true,
                   "dest_cidr_list":["198.51.100.0/24","bogus"]}"#),
            r#"rule #1 (id 23): dest_cidr_list[1]: "bogus" is not an IPv4 CIDR (expected A.B.C.D/N with N in 0..=32, or A.B.C.D)"#.into(),
        ),
    ];
    for (text, want) in cases {
        assert_eq!(refused(&s, &text), want, "{text}");
    }
}

#[test]
fn firewall_error_is_structured() {
    let s = state_after(&[STATICNAT]);
    let text = fw(
        r#"{"id":14,"traffic_type":"Ingress","src_ip":"203.0.113.101","protocol":"icmp","source_cidr_list":["192.0.2.0/25","192.0.2.0/33"]}"#,
    );
    let payload = parse(&text).unwrap();
    let mut clone = s.clone();
    match apply(&payload, &mut clone) {
        Err(CloudStackError::Rule {
            rule,
            field,
            problem: Problem::Cidr(_),
        }) => {
            assert_eq!(
                rule,
                RuleRef {
                    position: 1,
                    id: Some(14)
                }
            );
            assert_eq!(field, Some(Field::at("source_cidr_list", 1)));
        }
        other => panic!("{other:?}"),
    }
}

/// Not a refusal: CloudStack sends the rules of every public IP of the network; those of an IP
/// without static NAT (yet: its static NAT payload may come next; or a port forwarding or
/// source NAT IP) are kept, inactive, as the router's firewall databag keeps them.
#[test]
fn rules_of_ips_without_static_nat_are_kept_inactive_and_the_rest_applied() {
    let original = state_after(&[STATICNAT]);
    let text = r#"{"type":"firewallrules","rules":[
        {"id":31,"traffic_type":"Ingress","src_ip":"203.0.113.99","protocol":"tcp","source_cidr_list":["0.0.0.0/0"]},
        {"id":32,"traffic_type":"Ingress","src_ip":"203.0.113.101","protocol":"tcp","src_port_range":[443,443],"source_cidr_list":["0.0.0.0/0"]}]}"#;
    let mut new = original.clone();
    let summary = apply(&parse(text).unwrap(), &mut new).unwrap();
    let ids: Vec<u64> = new.ingress_rules().map(|r| r.rule.id).collect();
    assert_eq!(ids, vec![31, 32]);
    let active: Vec<u64> = new.active_ingress_rules().map(|r| r.rule.id).collect();
    assert_eq!(active, vec![32]);
    let lines: Vec<String> = summary.lines().collect();
    assert!(
        lines[0].contains("ingress rule 31 added, inactive: 203.0.113.99 has no static NAT"),
        "{lines:?}"
    );
}
