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
