//! The published JSON Schema of the config: current, and what an editor (or
//! any JSON Schema validator) would say about real files.

use std::process::Command;

use ambassador_tests::*;

#[test]
fn the_published_schema_is_what_the_binary_generates() {
    let out = Command::new(bin()).arg("schema").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let published = std::fs::read_to_string(workspace().join("docs/config.schema.json")).unwrap();
    assert!(
        stdout(&out) == published,
        "docs/config.schema.json is stale: run `ambassador schema > docs/config.schema.json`"
    );
}

/// A standard validator (python3-jsonschema) accepts every example and
/// rejects typos and bad values.
#[test]
fn a_standard_validator_accepts_the_examples_and_rejects_mistakes() {
    let script = r#"
import glob, json, sys, yaml, jsonschema
schema = json.load(open(sys.argv[1] + "/docs/config.schema.json"))
jsonschema.Draft7Validator.check_schema(schema)
for f in sorted(glob.glob(sys.argv[1] + "/examples/*.yaml")):
    jsonschema.validate(yaml.safe_load(open(f)) or {}, schema)
    print("ok", f.rsplit("/", 1)[1])
bad = [
    {"proxy": {"prot": 1}},
    {"proxy": {"connect_timeout": "soon"}},
    {"default": "allow"},
    {"services": [{"name": "a", "match": {"cidr": "10.0.0.0/8"}, "protocol": "udp"}]},
    {"services": [{"name": "a", "match": {"cidr": "10.0.0.0/8"},
                   "request": {"set_headers": {"x-a": {"valu": "b"}}}}]},
    {"telemetry": {"access_log": "loud"}},
]
for b in bad:
    try:
        jsonschema.validate(b, schema)
    except jsonschema.ValidationError:
        print("rejected")
        continue
    print("ACCEPTED", b)
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(workspace())
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(text.contains("ok http-egress.yaml"), "{text}");
    assert!(text.contains("ok failover.yaml"), "{text}");
    assert_eq!(text.matches("rejected").count(), 6, "{text}");
    assert!(!text.contains("ACCEPTED"), "{text}");
}
