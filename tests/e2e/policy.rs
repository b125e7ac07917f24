//! The policy engine through the gateway: stored deny rules, explain, policy-file hot reload
//! (a broken file keeps the previous policy), special-category data.

use arrow_flight::FlightDescriptor;
use passerelle::explain::explain;
use passerelle::manifest::Manifest;
use passerelle_policies::{DatasetId, Permit, Purpose};
use passerelle_tests::{TestGateway, pull, status_code};
use tonic::Code;

use crate::reference::consented;

const AI: &str = "research/ai-training";

fn path(name: &str) -> FlightDescriptor {
    FlightDescriptor::new_path(vec![name.to_string()])
}

#[tokio::test]
async fn a_member_state_deny_rule_beats_the_permit_and_explain_says_why() {
    let gw = TestGateway::start(2_000).await.unwrap();
    let line = passerelle::node::deny_line("demo_patients", "research/ai-training/commercial", "DE/*", None).unwrap();
    gw.node.meta.add_rule(&line, "test").await.unwrap();
    gw.node.refresh().await.unwrap();

    let mut commercial = gw
        .client(Some(&gw.key("trainer-de")), Some("research/ai-training/commercial"))
        .await
        .unwrap();
    let err = pull(&mut commercial, path("demo_patients")).await.unwrap_err();
    assert_eq!(status_code(&err), Some(Code::PermissionDenied));
    assert!(err.to_string().contains("deny"), "{err}");
    let mut ai = gw.client(Some(&gw.key("trainer-de")), Some(AI)).await.unwrap();
    assert!(!pull(&mut ai, path("demo_patients")).await.unwrap().is_empty());

    let e = explain(
        &gw.node,
        None,
        "trainer-de",
        "demo_patients",
        &Purpose::parse("research/ai-training/commercial/ads").unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(e.decision, "deny");
    assert!(e.rule.as_deref().unwrap_or_default().contains("DE/*"), "{e:?}");
    let e = explain(
        &gw.node,
        None,
        "trainer-de",
        "demo_patients",
        &Purpose::parse(AI).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(e.decision, "allow");
    assert_eq!(e.subjects_counted, consented(gw.data_dir(), AI, &[]).len());
    let fate = |c: &str| e.columns.iter().find(|f| f.name == c).unwrap().treatment.clone();
    assert_eq!(fate("full_name"), "dropped");
    assert_eq!(fate("patient_id"), "pseudonymised");
    assert_eq!(fate("birth_date"), "generalised:year");
    assert_eq!(fate("hba1c"), "sent");
    // A steward of another organisation cannot explain (or learn about) this dataset.
    gw.node
        .add_principal(&passerelle_policies::Principal {
            name: "steward-it".into(),
            org: "gemelli".into(),
            member_state: "IT".into(),
            role: passerelle_policies::Role::Steward,
        })
        .await
        .unwrap();
    let asker = passerelle_policies::Principal {
        name: "steward-it".into(),
        org: "gemelli".into(),
        member_state: "IT".into(),
        role: passerelle_policies::Role::Steward,
    };
    let err = explain(
        &gw.node,
        Some(&asker),
        "trainer-de",
        "demo_patients",
        &Purpose::parse(AI).unwrap(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.status(), passerelle::error::StatusClass::NotFound);
    gw.shutdown_and_wait().await.unwrap();
}

#[tokio::test]
async fn a_broken_policy_file_is_refused_and_the_previous_policy_stays() {
    let gw = TestGateway::start_with(1_000, |cfg, dir| {
        let file = dir.join("policy.csv");
        std::fs::write(
            &file,
            "p, *, *, demo_patients, research/ai-training, 9999-12-31T23:59:59Z, deny\n",
        )
        .unwrap();
        cfg.policy.policy_file = Some(file);
    })
    .await
    .unwrap();
    let file = gw.data_dir().join("policy.csv");
    let mut ai = gw.client(Some(&gw.key("trainer-de")), Some(AI)).await.unwrap();
    assert_eq!(
        status_code(&pull(&mut ai, path("demo_patients")).await.unwrap_err()),
        Some(Code::PermissionDenied)
    );
    let version_before = gw.node.snapshot().authorizer.version().to_string();

    std::fs::write(&file, "# lifted\np, *, *, demo_patients\n").unwrap();
    let err = gw.node.refresh().await.unwrap_err().to_string();
    assert!(err.contains("policy.csv") && err.contains("line 2"), "{err}");
    assert_eq!(
        gw.node.snapshot().authorizer.version(),
        version_before,
        "the previous policy stays in force"
    );
    assert_eq!(
        status_code(&pull(&mut ai, path("demo_patients")).await.unwrap_err()),
        Some(Code::PermissionDenied)
    );

    // While the file is broken, stored changes still take effect (over the last good file): a
    // grant, then a revocation by a stored deny rule. A write is not reported as failed.
    let mut m =
        Manifest::from_toml(&std::fs::read_to_string(gw.data_dir().join("demo/demo_patients.toml")).unwrap()).unwrap();
    m.name = DatasetId::parse("copy_patients").unwrap();
    gw.node.register_dataset(&m).await.unwrap();
    gw.node
        .add_permit(&Permit {
            dataset: DatasetId::parse("copy_patients").unwrap(),
            org: "dkfz".into(),
            purpose: Purpose::parse(AI).unwrap(),
            expires: None,
            special_category: false,
        })
        .await
        .unwrap();
    gw.node.refresh_after_write().await.unwrap();
    assert!(!pull(&mut ai, path("copy_patients")).await.unwrap().is_empty());
    let line = "p, *, DE/*, copy_patients, research, 9999-12-31T23:59:59Z, deny";
    gw.node.meta.add_rule(line, "steward").await.unwrap();
    gw.node.refresh_after_write().await.unwrap();
    assert_eq!(
        status_code(&pull(&mut ai, path("copy_patients")).await.unwrap_err()),
        Some(Code::PermissionDenied),
        "a deny rule stored while the file is broken is enforced"
    );
    let err = gw.node.refresh().await.unwrap_err().to_string();
    assert!(
        err.contains("policy.csv") && err.contains("line 2"),
        "still reported: {err}"
    );
    assert_eq!(
        status_code(&pull(&mut ai, path("demo_patients")).await.unwrap_err()),
        Some(Code::PermissionDenied),
        "the broken file's edit is not in force"
    );

    // A file that cannot be read (removed, mid-rename) is treated the same way.
    let before_removal = gw.node.snapshot().authorizer.version().to_string();
    std::fs::remove_file(&file).unwrap();
    gw.node
        .meta
        .add_rule(
            "p, *, DE/*, copy_patients, research/epidemiology, 9999-12-31T23:59:59Z, deny",
            "steward",
        )
        .await
        .unwrap();
    gw.node.refresh_after_write().await.unwrap();
    let err = gw.node.refresh().await.unwrap_err().to_string();
    assert!(err.contains("policy.csv"), "the unreadable file is named: {err}");
    assert!(
        gw.node.snapshot().authorizer.version() != before_removal,
        "the stored rule was applied over the last good file"
    );
    assert_eq!(
        status_code(&pull(&mut ai, path("demo_patients")).await.unwrap_err()),
        Some(Code::PermissionDenied),
        "the last good file's deny still holds"
    );

    std::fs::write(&file, "# lifted\n").unwrap();
    gw.node.refresh().await.unwrap();
    assert_ne!(gw.node.snapshot().authorizer.version(), version_before);
    assert!(!pull(&mut ai, path("demo_patients")).await.unwrap().is_empty());
    // Each access records the policy version that decided it.
    let rows = gw.node.audit.list(&Default::default()).await.unwrap();
    assert!(
        rows.iter()
            .any(|r| r.policy_version == version_before && r.decision == "deny")
    );
    assert!(
        rows.iter()
            .any(|r| r.policy_version != version_before && r.decision == "allow")
    );
    gw.shutdown_and_wait().await.unwrap();
}

#[tokio::test]
async fn special_category_columns_need_a_permit_that_names_the_condition() {
    let gw = TestGateway::start(1_000).await.unwrap();
    let mut m =
        Manifest::from_toml(&std::fs::read_to_string(gw.data_dir().join("demo/demo_patients.toml")).unwrap()).unwrap();
    m.name = DatasetId::parse("special_patients").unwrap();
    m.special_category = true;
    gw.node.register_dataset(&m).await.unwrap();
    let permit = |special| Permit {
        dataset: DatasetId::parse("special_patients").unwrap(),
        org: "dkfz".into(),
        purpose: Purpose::parse(AI).unwrap(),
        expires: None,
        special_category: special,
    };
    gw.node.add_permit(&permit(false)).await.unwrap();
    gw.node.refresh().await.unwrap();
    let mut ai = gw.client(Some(&gw.key("trainer-de")), Some(AI)).await.unwrap();
    let schema = ai.get_schema(path("special_patients")).await.unwrap();
    assert!(schema.field_with_name("diagnosis").is_err() && schema.field_with_name("hba1c").is_err());
    assert!(schema.field_with_name("admitted_at").is_ok());

    gw.node.add_permit(&permit(true)).await.unwrap();
    gw.node.refresh().await.unwrap();
    let schema = ai.get_schema(path("special_patients")).await.unwrap();
    assert!(schema.field_with_name("diagnosis").is_ok() && schema.field_with_name("hba1c").is_ok());
    gw.shutdown_and_wait().await.unwrap();
}

/// Rows per (birth_date, postcode) combination, from a pulled stream.
fn qi_groups(batches: &[arrow::array::RecordBatch]) -> std::collections::HashMap<(i32, String), usize> {
    use arrow::array::AsArray;
    let mut groups = std::collections::HashMap::new();
    for b in batches {
        let birth = b
            .column_by_name("birth_date")
            .unwrap()
            .as_primitive::<arrow::datatypes::Date32Type>();
        let post = b.column_by_name("postcode").unwrap().as_string::<i32>();
        for i in 0..b.num_rows() {
            *groups.entry((birth.value(i), post.value(i).to_string())).or_default() += 1;
        }
    }
    groups
}

/// The demo data as `kanon_patients`, with a k-anonymity floor of 3 and dkfz's permit.
async fn register_kanon(gw: &TestGateway) {
    let mut m =
        Manifest::from_toml(&std::fs::read_to_string(gw.data_dir().join("demo/demo_patients.toml")).unwrap()).unwrap();
    m.name = DatasetId::parse("kanon_patients").unwrap();
    m.k_anonymity = Some(3);
    gw.node.register_dataset(&m).await.unwrap();
    gw.node
        .add_permit(&Permit {
            dataset: DatasetId::parse("kanon_patients").unwrap(),
            org: "dkfz".into(),
            purpose: Purpose::parse(AI).unwrap(),
            expires: None,
            special_category: false,
        })
        .await
        .unwrap();
    gw.node.refresh().await.unwrap();
}

#[tokio::test]
async fn a_k_anonymity_floor_larger_than_the_memory_pool_is_resource_exhausted() {
    // The floor holds the stream before its first row leaves: bounded by `sql.memory_limit_mb`.
    let gw = TestGateway::start_with(200_000, |cfg, _| cfg.sql.memory_limit_mb = 1)
        .await
        .unwrap();
    register_kanon(&gw).await;
    let mut ai = gw.client(Some(&gw.key("trainer-de")), Some(AI)).await.unwrap();
    let err = pull(&mut ai, path("kanon_patients")).await.unwrap_err();
    assert_eq!(status_code(&err), Some(Code::ResourceExhausted), "{err:?}");
    // A plain stream of the same data is not bounded by the pool.
    assert!(!pull(&mut ai, path("demo_patients")).await.unwrap().is_empty());
    gw.shutdown_and_wait().await.unwrap();
}

#[tokio::test]
async fn the_k_anonymity_floor_suppresses_rare_quasi_identifier_combinations() {
    let gw = TestGateway::start(4_000).await.unwrap();
    register_kanon(&gw).await;
    let mut ai = gw.client(Some(&gw.key("trainer-de")), Some(AI)).await.unwrap();

    for filter in [None, Some("hba1c > 9")] {
        let cmd = |ds: &str| {
            let mut v = serde_json::json!({ "dataset": ds });
            if let Some(f) = filter {
                v["filter"] = f.into();
            }
            passerelle_tests::command(v)
        };
        // The floor counts what the stream releases: the unfloored stream's combinations of at
        // least 3 rows, after the same filter.
        let open = pull(&mut ai, cmd("demo_patients")).await.unwrap();
        let expected: usize = qi_groups(&open).values().filter(|n| **n >= 3).sum();
        let rare: usize = qi_groups(&open).values().filter(|n| **n < 3).sum();
        assert!(rare > 0, "the demo has rare combinations to suppress");
        let floored = pull(&mut ai, cmd("kanon_patients")).await.unwrap();
        let groups = qi_groups(&floored);
        assert!(groups.values().all(|n| *n >= 3), "{filter:?}: {groups:?}");
        assert_eq!(groups.values().sum::<usize>(), expected, "{filter:?}");
    }
    // Columns requested without the quasi-identifiers are floored all the same.
    let only = pull(
        &mut ai,
        passerelle_tests::command(serde_json::json!({ "dataset": "kanon_patients", "columns": ["hba1c"] })),
    )
    .await
    .unwrap();
    let all = pull(&mut ai, path("kanon_patients")).await.unwrap();
    let n = |b: &[arrow::array::RecordBatch]| b.iter().map(|b| b.num_rows()).sum::<usize>();
    assert_eq!(n(&only), n(&all));
    // SQL sees the floored dataset.
    let mut sql = passerelle_tests::sql::sql_client(&gw, &gw.key("trainer-de"), AI)
        .await
        .unwrap();
    let got = passerelle_tests::sql::query(&mut sql, "SELECT count(*) FROM kanon_patients")
        .await
        .unwrap();
    use arrow::array::AsArray;
    assert_eq!(
        got[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0) as usize,
        n(&all)
    );
    gw.shutdown_and_wait().await.unwrap();
}

#[tokio::test]
async fn a_rotated_pseudonym_key_reaches_the_running_server() {
    use arrow::array::{Array, AsArray};
    let gw = TestGateway::start(1_000).await.unwrap();
    let mut ai = gw.client(Some(&gw.key("trainer-de")), Some(AI)).await.unwrap();
    let ids = |batches: &[arrow::array::RecordBatch]| -> std::collections::HashSet<String> {
        batches
            .iter()
            .flat_map(|b| {
                let c = b.column_by_name("patient_id").unwrap().as_string::<i32>().clone();
                (0..c.len()).map(move |i| c.value(i).to_string())
            })
            .collect()
    };
    let before = ids(&pull(&mut ai, path("demo_patients")).await.unwrap());
    assert!(before.iter().all(|p| p.starts_with("01")));
    assert_eq!(passerelle::node::rotate_pseudonym_key(gw.data_dir()).unwrap(), 2);
    gw.node.refresh().await.unwrap();
    let after = ids(&pull(&mut ai, path("demo_patients")).await.unwrap());
    assert_eq!(after.len(), before.len());
    assert!(after.iter().all(|p| p.starts_with("02")), "new version byte");
    assert!(after.is_disjoint(&before));
    gw.shutdown_and_wait().await.unwrap();
}
