//! Property tests (fuzzing with shrinking) for every decoder that reads bytes from outside: Flight
//! tickets, JSON commands, manifests (TOML and JSON), consent CSV and JSON Lines, authorization
//! headers. Each must answer arbitrary and mutated input with a clean error of the right class —
//! never a panic, never `INTERNAL` — and a ticket with any byte changed never verifies.
//!
//! `PROPTEST_CASES` sets the iterations per property (default 3000, what `.ci/run` runs; raise it
//! for a longer fuzzing session).

use std::sync::Arc;

use passerelle::catalog::DataCommand;
use passerelle::error::StatusClass;
use passerelle::manifest::Manifest;
use passerelle::signing::NodeKey;
use passerelle::ticket::{TicketClaims, TicketSigner};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

fn signer() -> TicketSigner {
    static KEY: std::sync::OnceLock<Arc<NodeKey>> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        Arc::new(NodeKey::load_or_create(&dir.path().join("node.key")).unwrap())
    });
    TicketSigner::new(Arc::clone(key), "node-test".into())
}

fn claims(principal: String, filter: Option<String>, columns: Option<Vec<String>>) -> TicketClaims {
    TicketClaims {
        v: passerelle::ticket::TICKET_VERSION,
        iss: String::new(),
        kid: String::new(),
        iat: 0,
        principal,
        org: "dkfz".into(),
        member_state: "DE".into(),
        consent_version: 7,
        policy_version: "p".into(),
        purpose: "research/ai-training".into(),
        dataset: "demo_patients".into(),
        columns,
        filter,
        limit: Some(10),
        exp: i64::MAX,
        nonce: 1,
        sql: None,
        part: None,
        skip: 0,
        aggregate: None,
        fill_nulls: None,
        role: None,
    }
}

const MANIFEST: &str = r#"
name = "d"
location = "file:///tmp/d/"
format = "parquet"
member_state = "FR"
controller = "aphp"
subject_column = "patient_id"
legal_basis = "consent"
purposes = ["research/ai-training"]
[columns]
patient_id = { class = "identifier" }
"#;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn arbitrary_tickets_are_refused_as_invalid_arguments(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let e = signer().verify(&bytes, 0).unwrap_err();
        prop_assert_eq!(e.status(), StatusClass::InvalidArgument);
    }

    #[test]
    fn a_ticket_with_any_byte_changed_never_verifies(
        principal in "[a-z-]{1,20}",
        filter in proptest::option::of(".{0,40}"),
        columns in proptest::option::of(proptest::collection::vec("[a-z_]{1,10}", 0..4)),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let s = signer();
        let c = claims(principal, filter, columns);
        let t = s.sign(&c).unwrap();
        let good = s.verify(&t, 0).unwrap();
        prop_assert_eq!(&good.principal, &c.principal);
        let i = at.index(t.len());
        let mut bad = t.clone();
        bad[i] ^= flip;
        prop_assert!(s.verify(&bad, 0).is_err());
        // Truncated or extended tickets neither.
        prop_assert!(s.verify(&t[..i], 0).is_err());
        let mut longer = t.clone();
        longer.push(b'A');
        prop_assert!(s.verify(&longer, 0).is_err());
    }

    #[test]
    fn json_commands_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Err(e) = DataCommand::from_json(&bytes) {
            prop_assert_eq!(e.status(), StatusClass::InvalidArgument);
        }
    }

    #[test]
    fn json_shaped_commands_never_panic(
        dataset in proptest::option::of(".{0,20}"),
        columns in proptest::option::of(proptest::collection::vec(".{0,8}", 0..4)),
        filter in proptest::option::of(".{0,30}"),
        limit in proptest::option::of(any::<i64>()),
        extra in proptest::option::of("[a-z]{1,6}"),
    ) {
        let mut v = serde_json::json!({});
        if let Some(d) = dataset { v["dataset"] = d.into(); }
        if let Some(c) = columns { v["columns"] = c.into(); }
        if let Some(f) = filter { v["filter"] = f.into(); }
        if let Some(l) = limit { v["limit"] = l.into(); }
        if let Some(x) = extra { v[x] = 1.into(); }
        if let Err(e) = DataCommand::from_json(v.to_string().as_bytes()) {
            prop_assert_eq!(e.status(), StatusClass::InvalidArgument);
        }
    }

    #[test]
    fn mutated_manifests_are_clean_errors(at in any::<prop::sample::Index>(), insert in ".{0,12}", cut in 0usize..20) {
        let i = at.index(MANIFEST.len());
        let end = (i + cut).min(MANIFEST.len());
        let text = format!("{}{}{}", &MANIFEST[..i], insert, &MANIFEST[end..]);
        match Manifest::from_toml(&text) {
            // Whatever parses must also yield its policy and source without panicking.
            Ok(m) => {
                let _ = (m.policy(), m.source().normalised_location());
            }
            Err(e) => prop_assert_eq!(e.status(), StatusClass::InvalidArgument),
        }
    }

    #[test]
    fn arbitrary_json_manifests_are_clean_errors(keys in proptest::collection::vec(("[a-z_]{1,16}", ".{0,10}"), 0..12)) {
        let mut v = serde_json::Map::new();
        for (k, val) in keys {
            v.insert(k, serde_json::Value::String(val));
        }
        if let Err(e) = Manifest::from_json(serde_json::Value::Object(v)) {
            prop_assert_eq!(e.status(), StatusClass::InvalidArgument);
        }
    }

    #[test]
    fn consent_csv_and_jsonl_never_panic(text in "(?s).{0,400}") {
        for parsed in [
            passerelle::consent_file::parse_csv(&text),
            passerelle::consent_file::parse_jsonl(&text),
        ] {
            if let Err(e) = parsed {
                prop_assert_eq!(e.status(), StatusClass::InvalidArgument);
            }
        }
    }

    #[test]
    fn consent_csv_shaped_rows_never_panic(
        rows in proptest::collection::vec(("[0-9a-z]{0,6}", "[a-z/-]{0,20}", "granted|withdrawn|maybe|", "[0-9T:Z+-]{0,25}"), 0..20),
    ) {
        let mut text = String::from("subject_id,purpose,status,timestamp\n");
        for (s, p, st, t) in rows {
            text.push_str(&format!("{s},{p},{st},{t}\n"));
        }
        if let Err(e) = passerelle::consent_file::parse_csv(&text) {
            prop_assert_eq!(e.status(), StatusClass::InvalidArgument);
        }
    }

    #[test]
    fn authorization_headers_never_panic(header in "(?s).{0,200}") {
        if let Err(e) = passerelle::auth::parse_authorization(&header) {
            prop_assert_eq!(e.status(), StatusClass::Unauthenticated);
        }
    }
}
