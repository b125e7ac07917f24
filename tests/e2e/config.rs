//! The example configurations in deploy/config/ are documentation: each must load and validate.

use passerelle::config::GatewayConfig;

#[test]
fn every_example_config_loads() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().ends_with(".example.toml") {
            let cfg = GatewayConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            cfg.validate().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(cfg.data_dir.is_some(), "{}", path.display());
            seen += 1;
        }
    }
    assert!(seen >= 2, "expected the example configs in {}", dir.display());
    let node = GatewayConfig::load(&dir.join("node.example.toml")).unwrap();
    assert_eq!(node.server.flight_addr, "0.0.0.0:50051");
    assert_eq!(node.tickets.ttl_secs, 600);
    assert_eq!(node.sql, passerelle::sql::SqlOptions::default());
    assert_eq!(node.stores["lake"].kind, passerelle_connectors::StoreKind::S3);
    assert_eq!(node.locations["aphp-lake"].store.as_deref(), Some("lake"));
    assert_eq!(node.checked_locations().unwrap().sections().len(), 2);
    assert_eq!(node.sources.cache_ttl_secs, 60);
    assert_eq!(node.limits, passerelle::limits::LimitOptions::default());
    assert_eq!(node.node_id.as_deref(), Some("gw-fr"));
    let tls = node.tls.expect("the example documents [tls]");
    assert!(tls.allow_bearer && !tls.require_client_cert && tls.client_ca.is_some());
    // Every trust anchor is bound to its member state by fingerprint.
    assert_eq!(tls.anchors.keys().map(String::as_str).collect::<Vec<_>>(), ["DE", "FR"]);
}
