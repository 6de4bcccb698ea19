//! The operator's certificate authority and the certificates it mints for each volume.
//!
//! One CA per operator, kept in the Secret `tandem-ca` (keys `ca.crt`, `ca.key`) in the operator's
//! namespace and created when missing; valid 10 years. Per volume: an engine TLS Secret per slot
//! (identity `Engine{volume}`, DNS SANs the slot's Service names) and one CSI Secret (token, `ca.crt`,
//! and `csi.<node>.crt`/`.key` with identity `Csi{volume, node}` for each engine node). Leaves live
//! `--cert-validity` (90 days by default) and are issued again when less than a third is left, when
//! another CA signed them, or when they speak for another identity (`plan::needs_cert`).

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{api::core::v1::Secret, jiff::Timestamp, ByteString};
use kube::{api::PostParams, Api, Client};
use tandem_api::{
    contract::{secret_csi_cert_key, secret_csi_key_key, SECRET_CA_KEY, SECRET_TOKEN_KEY},
    tls::{
        mint::{identity_of_pem, not_after},
        Ca, Identity, Issued, TlsError, CA_FILE, CERT_FILE, KEY_FILE,
    },
};

use crate::{
    crd::{MirroredVolume, Slot},
    observed::CertsObs,
    plan::{self, names, CertPlan, EngineConfig},
    Error, Result,
};

/// The Secret holding the operator's CA, in the operator's namespace.
pub const CA_SECRET: &str = "tandem-ca";
/// Its keys.
pub const CA_CERT_KEY: &str = "ca.crt";
pub const CA_KEY_KEY: &str = "ca.key";
/// The CA's lifetime.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn text<'a>(data: &'a BTreeMap<String, ByteString>, key: &str) -> Option<&'a str> {
    data.get(key)
        .and_then(|b| std::str::from_utf8(&b.0).ok())
        .filter(|s| !s.is_empty())
}

/// The CA of the Secret `tandem-ca`, created when missing. Two replicas starting together both try to
/// create it; the loser reads the winner's. Invariant: the CA is created, never overwritten (a replaced CA
/// would invalidate every certificate in the cluster); test
/// `certs::tests::the_ca_is_created_when_missing_and_a_concurrent_one_is_never_replaced`.
pub async fn ensure_ca(client: Client, namespace: &str) -> Result<Ca> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    for _ in 0..2 {
        if let Some(secret) = api.get_opt(CA_SECRET).await? {
            return ca_of(&secret);
        }
        let ca = Ca::generate("tandem operator CA", CA_VALIDITY).map_err(tls)?;
        let secret = Secret {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(CA_SECRET.into()),
                namespace: Some(namespace.into()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "tandem-operator".to_string(),
                )])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([
                (
                    CA_CERT_KEY.to_string(),
                    ByteString(ca.cert_pem().as_bytes().to_vec()),
                ),
                (
                    CA_KEY_KEY.to_string(),
                    ByteString(ca.key_pem().as_bytes().to_vec()),
                ),
            ])),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => return Ok(ca),
            // Another replica created it meanwhile: read theirs.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Tls(format!(
        "secret {namespace}/{CA_SECRET} was created and vanished again"
    )))
}

/// The CA kept in a `tandem-ca` Secret.
pub fn ca_of(secret: &Secret) -> Result<Ca> {
    let empty = BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    let (Some(cert), Some(key)) = (text(data, CA_CERT_KEY), text(data, CA_KEY_KEY)) else {
        return Err(Error::Tls(format!(
            "secret {CA_SECRET} lacks {CA_CERT_KEY} or {CA_KEY_KEY}"
        )));
    };
    Ca::from_pem(cert, key).map_err(tls)
}

/// The operator's own client certificate (identity `Operator`) and the CA's PEM, for its gRPC calls to
/// the engines.
pub fn operator_identity(ca: &Ca, valid_for: Duration) -> Result<(Issued, String)> {
    let issued = ca.issue(&Identity::Operator, &[], valid_for).map_err(tls)?;
    Ok((issued, ca.cert_pem().to_string()))
}

/// Makes the operator's identity the default of every gRPC channel it opens, and keeps it fresh:
/// a new certificate once a third of the last one's life is left (live channels keep theirs; the next
/// connection uses the new one). Without this the engines, which require mutual TLS, answer the
/// operator UNAUTHENTICATED.
pub fn serve_operator_identity(ca: Ca, valid_for: Duration) -> Result<tokio::task::JoinHandle<()>> {
    let install = move |ca: &Ca| -> Result<()> {
        let (issued, ca_pem) = operator_identity(ca, valid_for)?;
        let client =
            tandem_api::tls::ClientTls::from_pem(&ca_pem, &issued.cert_pem, &issued.key_pem)
                .map_err(tls)?;
        tandem_api::tls::set_default_client(Some(client));
        Ok(())
    };
    install(&ca)?;
    let renew_every = (valid_for * 2 / 3).max(Duration::from_secs(60));
    Ok(tokio::spawn(async move {
        loop {
            tokio::time::sleep(renew_every).await;
            match install(&ca) {
                Ok(()) => tracing::info!("operator client certificate renewed"),
                // The old certificate stays in use; it still has a third of its life.
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the operator's client certificate failed")
                }
            }
        }
    }))
}

fn tls(e: TlsError) -> Error {
    Error::Tls(e.to_string())
}

/// A leaf in `data` is usable when the Secret's CA is ours, the key is there and the certificate speaks
/// for `expected`: its expiry then, else `None`.
fn leaf(
    data: &BTreeMap<String, ByteString>,
    ca_pem: &str,
    ca_key: &str,
    cert_key: &str,
    key_key: &str,
    expected: &Identity,
) -> Option<Timestamp> {
    if text(data, ca_key)? != ca_pem {
        return None;
    }
    text(data, key_key)?;
    let cert = text(data, cert_key)?;
    if identity_of_pem(cert).ok()? != *expected {
        return None;
    }
    Timestamp::try_from(not_after(cert).ok()?).ok()
}

/// What the volume's Secrets (already checked to be its own) hold: each certificate's expiry.
pub fn observe(
    mv: &MirroredVolume,
    secrets: &[Secret],
    ca: &Ca,
    token: Option<&str>,
    nodes: &[String; 2],
) -> CertsObs {
    let key = plan::key(mv);
    let find = |name: String| {
        secrets
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name.as_str()))
            .and_then(|s| s.data.as_ref())
    };
    let engine_id = plan::engine_identity(mv);
    let engine = Slot::BOTH.map(|slot| {
        let data = find(names::tls_secret(&key, slot))?;
        leaf(
            data,
            ca.cert_pem(),
            CA_FILE,
            CERT_FILE,
            KEY_FILE,
            &engine_id,
        )
    });
    let csi = find(plan::csi_secret_name(mv)).and_then(|data| {
        // The CSI Secret carries the token too: a stale one is issued again with the current token.
        if text(data, SECRET_TOKEN_KEY) != token {
            return None;
        }
        let [a, b] = nodes.clone().map(|node| {
            leaf(
                data,
                ca.cert_pem(),
                SECRET_CA_KEY,
                &secret_csi_cert_key(&node),
                &secret_csi_key_key(&node),
                &plan::csi_identity(mv, &node),
            )
        });
        Some(a?.min(b?))
    });
    CertsObs { engine, csi }
}

/// Mints what `plan` asks for: the Secrets to apply and the new observation of the volume's certificates.
pub fn mint(
    mv: &MirroredVolume,
    plan: &CertPlan,
    ca: &Ca,
    cfg: &EngineConfig,
    token: &str,
    nodes: &[String; 2],
    mut certs: CertsObs,
) -> Result<(Vec<Secret>, CertsObs)> {
    let mut out = Vec::new();
    let stamp = |issued: &Issued| Timestamp::try_from(issued.not_after).ok();
    for slot in Slot::BOTH {
        if plan.engine[slot.index()] {
            let dns = plan::engine_dns_names(mv, slot, cfg);
            let issued = ca
                .issue(&plan::engine_identity(mv), &dns, cfg.cert_validity)
                .map_err(tls)?;
            certs.engine[slot.index()] = stamp(&issued);
            out.push(plan::engine_tls_secret(
                mv,
                slot,
                cfg,
                ca.cert_pem(),
                &issued,
            ));
        }
    }
    if plan.csi {
        let mut leaves = Vec::new();
        for node in nodes {
            let issued = ca
                .issue(&plan::csi_identity(mv, node), &[], cfg.cert_validity)
                .map_err(tls)?;
            leaves.push((node.clone(), issued));
        }
        certs.csi = leaves.iter().filter_map(|(_, l)| stamp(l)).min();
        out.push(plan::csi_secret(mv, cfg, token, ca.cert_pem(), &leaves));
    }
    Ok((out, certs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::SignedDuration;
    use serde_json::Value;

    fn ca() -> Ca {
        Ca::generate("test", Duration::from_secs(3600)).unwrap()
    }

    fn nodes() -> [String; 2] {
        ["n1".to_string(), "n2".to_string()]
    }

    fn data(s: &Secret) -> &BTreeMap<String, ByteString> {
        s.data.as_ref().unwrap()
    }

    /// Every Secret of the volume, minted afresh with token `tok` for nodes n1, n2.
    fn mint_all(mv: &MirroredVolume, ca: &Ca) -> (Vec<Secret>, CertsObs) {
        let all = CertPlan {
            engine: [true, true],
            csi: true,
        };
        let cfg = EngineConfig::default();
        mint(mv, &all, ca, &cfg, "tok", &nodes(), CertsObs::default()).unwrap()
    }

    fn pem(s: &Secret, key: &str) -> String {
        String::from_utf8(data(s)[key].0.clone()).unwrap()
    }

    #[test]
    fn engine_secrets_speak_for_the_volume_and_csi_one_identity_per_node() {
        let mv = MirroredVolume::test();
        let ca = ca();
        let (secrets, certs) = mint_all(&mv, &ca);
        assert_eq!(secrets.len(), 3);
        let volume = tandem_api::tls::VolumeRef::new("default", "data");
        for (secret, slot) in secrets[..2].iter().zip(Slot::BOTH) {
            assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
            assert_eq!(
                secret.metadata.name.as_deref(),
                Some(names::tls_secret(&plan::key(&mv), slot).as_str())
            );
            assert_eq!(secret.metadata.namespace.as_deref(), Some("tandem-system"));
            assert_eq!(
                identity_of_pem(&pem(secret, CERT_FILE)).unwrap(),
                Identity::Engine {
                    volume: volume.clone()
                }
            );
            assert_eq!(pem(secret, CA_FILE), ca.cert_pem());
        }
        let csi = &secrets[2];
        assert_eq!(pem(csi, "token"), "tok");
        assert_eq!(pem(csi, "ca.crt"), ca.cert_pem());
        for node in ["n1", "n2"] {
            assert_eq!(
                identity_of_pem(&pem(csi, &format!("csi.{node}.crt"))).unwrap(),
                Identity::Csi {
                    volume: volume.clone(),
                    node: node.into()
                }
            );
            assert!(pem(csi, &format!("csi.{node}.key")).contains("PRIVATE KEY"));
        }
        let mut keys: Vec<&String> = data(csi).keys().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "ca.crt",
                "csi.n1.crt",
                "csi.n1.key",
                "csi.n2.crt",
                "csi.n2.key",
                "tandem-engines",
                "tandem-nbd",
                "token"
            ]
        );
        // The engine maps the CSI plugins prefer to the PV's (they follow a live move).
        let engines = pem(csi, "tandem-engines");
        assert!(
            engines.starts_with("n1=") && engines.contains(",n2="),
            "{engines}"
        );
        assert!(pem(csi, "tandem-nbd").contains("n2=unix:/run/tandem/volumes/"));
        // What was minted is what a later pass observes.
        assert_eq!(observe(&mv, &secrets, &ca, Some("tok"), &nodes()), certs);
        assert!(certs.earliest().is_some());
    }

    #[test]
    fn another_ca_a_stale_token_or_another_volume_means_issue_again() {
        let mv = MirroredVolume::test();
        let ca = ca();
        let (secrets, _) = mint_all(&mv, &ca);
        let seen = observe(&mv, &secrets, &self::ca(), Some("tok"), &nodes());
        assert_eq!(seen, CertsObs::default(), "signed by another CA");
        let seen = observe(&mv, &secrets, &ca, Some("new"), &nodes());
        assert!(seen.csi.is_none() && seen.engine.iter().all(Option::is_some));
        let mut other = MirroredVolume::test();
        other.metadata.name = Some("other".into());
        let (foreign, _) = mint_all(&other, &ca);
        // Renamed to this volume's Secrets, the other volume's certificates are still refused.
        let renamed: Vec<Secret> = foreign
            .into_iter()
            .zip(&secrets)
            .map(|(mut f, ours)| {
                f.metadata.name = ours.metadata.name.clone();
                f
            })
            .collect();
        assert_eq!(
            observe(&mv, &renamed, &ca, Some("tok"), &nodes()),
            CertsObs::default()
        );
    }

    #[test]
    fn reissued_when_a_third_is_left() {
        let validity = Duration::from_secs(90 * 24 * 3600);
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let days = |d: i64| Some(now.checked_add(SignedDuration::from_hours(24 * d)).unwrap());
        assert!(plan::needs_cert(None, now, validity));
        assert!(!plan::needs_cert(days(31), now, validity));
        assert!(plan::needs_cert(days(29), now, validity));
        assert!(plan::needs_cert(days(-1), now, validity));
    }

    #[tokio::test]
    async fn the_ca_is_created_when_missing_and_a_concurrent_one_is_never_replaced() {
        use crate::fixtures::{finish, not_found, Call, OP_NS};
        use serde_json::json;
        let path = format!("/api/v1/namespaces/{OP_NS}/secrets/{CA_SECRET}");
        let b64 = |s: &str| serde_json::to_value(ByteString(s.as_bytes().to_vec())).unwrap();

        // Missing: one is generated and created (never an apply, which would overwrite).
        let (ctx, verifier, _) = crate::controller::Context::test(Default::default());
        let posted = std::sync::Arc::new(std::sync::Mutex::new(Value::Null));
        let keep = posted.clone();
        let handle = verifier.run(vec![
            Call::get(&path).reply(404, not_found("secret")),
            Call::post(&format!("/api/v1/namespaces/{OP_NS}/secrets?")).check(move |body| {
                *keep.lock().unwrap() = body.clone();
            }),
        ]);
        let ca = ensure_ca(ctx.client.clone(), OP_NS).await.unwrap();
        drop(ctx);
        finish(handle).await;
        let body = posted.lock().unwrap().clone();
        assert_eq!(body["data"][CA_CERT_KEY], b64(ca.cert_pem()));
        assert_eq!(body["data"][CA_KEY_KEY], b64(ca.key_pem()));

        // Another replica created it between our read and our create: theirs is used.
        let theirs = self::ca();
        let stored = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": CA_SECRET, "namespace": OP_NS},
            "data": {CA_CERT_KEY: b64(theirs.cert_pem()), CA_KEY_KEY: b64(theirs.key_pem())},
        });
        let conflict = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                              "reason": "AlreadyExists", "code": 409, "message": "exists"});
        let (ctx, verifier, _) = crate::controller::Context::test(Default::default());
        let handle = verifier.run(vec![
            Call::get(&path).reply(404, not_found("secret")),
            Call::post(&format!("/api/v1/namespaces/{OP_NS}/secrets?")).reply(409, conflict),
            Call::get(&path).reply(200, stored),
        ]);
        let ca = ensure_ca(ctx.client.clone(), OP_NS).await.unwrap();
        drop(ctx);
        finish(handle).await;
        assert_eq!(ca.cert_pem(), theirs.cert_pem());
    }

    #[test]
    fn the_operator_identity_is_the_operator() {
        let ca = ca();
        let (issued, ca_pem) = operator_identity(&ca, Duration::from_secs(600)).unwrap();
        assert_eq!(ca_pem, ca.cert_pem());
        assert_eq!(
            identity_of_pem(&issued.cert_pem).unwrap(),
            Identity::Operator
        );
    }
}
