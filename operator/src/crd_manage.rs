//! `run --manage-crd`: the operator keeps the MirroredVolume CRD at the schema it was built with.
//! Helm installs a chart's `crds/` once and never upgrades them, so without this a `helm upgrade`
//! would run a new operator against an old schema (operator/README.md, "The CRD and upgrades").
//!
//! One server-side apply (field manager `tandem-operator`, forced: the fields Helm or kubectl set
//! become ours), never a downgrade: a CRD with a version this binary does not know is refused, and a
//! CRD a newer release applied is kept as it is.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    api::{Patch, PatchParams},
    Api, CustomResourceExt,
};

use crate::{controller::FIELD_MANAGER, crd::MirroredVolume};

/// The CRD's name, the only one the chart's RBAC lets the operator read or write.
pub const CRD_NAME: &str = "mirroredvolumes.tandem.dev";
/// Names the operator release that last applied the CRD (the downgrade guard reads it).
pub const RELEASE_ANNOTATION: &str = "tandem.dev/operator-version";

/// Why the operator did not apply its CRD.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// The cluster's CRD has versions this binary cannot read or write: a newer release installed
    /// them. Applying ours would drop them (or be rejected for a stored one), so the operator stops.
    #[error(
        "CRD {CRD_NAME} has version(s) {unknown:?} that this operator ({release}, versions {ours:?}) does not know: a newer Tandem release installed it; refusing to downgrade it (run the newer operator image, or pass --manage-crd=false)"
    )]
    UnknownVersions {
        unknown: Vec<String>,
        ours: Vec<String>,
        release: String,
    },
    /// The API server refused or failed the call (RBAC, connectivity, validation).
    #[error("applying CRD {CRD_NAME}: {0}")]
    Kube(#[from] kube::Error),
    /// The applied CRD did not become Established in time.
    #[error("CRD {CRD_NAME} was applied but is not Established after {0:?}")]
    NotEstablished(Duration),
}

/// What [`apply`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Applied (created, updated, or already equal: an apply of the same object changes nothing).
    Applied,
    /// Left alone: a newer release (named) applied it, with only versions this binary knows.
    KeptNewer(String),
}

/// The CRD this binary applies: `tandem-operator crd`'s, stamped with `release`.
pub fn desired(release: &semver::Version) -> CustomResourceDefinition {
    let mut crd = MirroredVolume::crd();
    crd.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(RELEASE_ANNOTATION.into(), release.to_string());
    crd
}

/// This binary's release (the workspace version).
pub fn this_release() -> semver::Version {
    // CARGO_PKG_VERSION is a valid semver by cargo's own rules; the fallback only keeps this total.
    semver::Version::parse(env!("CARGO_PKG_VERSION"))
        .unwrap_or_else(|_| semver::Version::new(0, 0, 0))
}

fn version_names(crd: &CustomResourceDefinition) -> Vec<String> {
    crd.spec.versions.iter().map(|v| v.name.clone()).collect()
}

/// Whether to apply `ours` over `existing`. Pure, so the guard is tested without an API server.
pub fn decide(
    existing: Option<&CustomResourceDefinition>,
    release: &semver::Version,
) -> Result<Option<String>, CrdError> {
    let Some(existing) = existing else {
        return Ok(None);
    };
    let ours = version_names(&MirroredVolume::crd());
    // Downgrade guard, part 1 (test: crd_manage::tests::refuses_a_crd_with_an_unknown_stored_version):
    // every version the cluster serves or has stored objects in must be one this binary knows, or
    // the apply would remove it (losing clients of it) or strand objects stored in it.
    let stored = existing
        .status
        .as_ref()
        .and_then(|s| s.stored_versions.clone())
        .unwrap_or_default();
    let mut unknown: Vec<String> = version_names(existing)
        .into_iter()
        .chain(stored)
        .filter(|v| !ours.contains(v))
        .collect();
    unknown.sort();
    unknown.dedup();
    if !unknown.is_empty() {
        return Err(CrdError::UnknownVersions {
            unknown,
            ours,
            release: release.to_string(),
        });
    }
    // Part 2 (test: crd_manage::tests::keeps_a_crd_a_newer_release_applied): a newer release's
    // schema of the same version may have fields ours lacks; applying ours would prune them from
    // every object written afterwards. An annotation that does not parse is not trusted either.
    let theirs = existing
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(RELEASE_ANNOTATION));
    match theirs {
        None => Ok(None),
        Some(text) => match semver::Version::parse(text) {
            Ok(v) if v <= *release => Ok(None),
            _ => Ok(Some(text.clone())),
        },
    }
}

fn established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
}

/// Applies this binary's CRD unless [`decide`] says otherwise, then waits until it is Established
/// (at most `wait`, polling every `poll`), so the controller's watch finds the schema it expects.
pub async fn apply(
    api: &Api<CustomResourceDefinition>,
    release: &semver::Version,
    wait: Duration,
    poll: Duration,
) -> Result<Outcome, CrdError> {
    let existing = api.get_opt(CRD_NAME).await?;
    if let Some(newer) = decide(existing.as_ref(), release)? {
        return Ok(Outcome::KeptNewer(newer));
    }
    let crd = desired(release);
    let applied = api
        .patch(
            CRD_NAME,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await?;
    let deadline = tokio::time::Instant::now() + wait;
    let mut current = applied;
    while !established(&current) {
        if tokio::time::Instant::now() >= deadline {
            return Err(CrdError::NotEstablished(wait));
        }
        tokio::time::sleep(poll).await;
        current = api.get(CRD_NAME).await?;
    }
    Ok(Outcome::Applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{finish, mock_client, not_found, Call};
    use http::Method;
    use serde_json::{json, Value};

    const PATH: &str =
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/mirroredvolumes.tandem.dev";

    fn release(v: &str) -> semver::Version {
        semver::Version::parse(v).unwrap()
    }

    /// The CRD as the API server holds it: `versions` served and stored, applied by `by`.
    fn existing(versions: &[&str], stored: &[&str], by: Option<&str>) -> Value {
        let mut crd = serde_json::to_value(MirroredVolume::crd()).unwrap();
        let template = crd["spec"]["versions"][0].clone();
        crd["spec"]["versions"] = versions
            .iter()
            .map(|v| {
                let mut t = template.clone();
                t["name"] = json!(v);
                t["storage"] = json!(*v == versions[0]);
                t
            })
            .collect();
        if let Some(by) = by {
            crd["metadata"]["annotations"] = json!({ RELEASE_ANNOTATION: by });
        }
        crd["status"] = established_status(stored);
        crd
    }

    fn established_status(stored: &[&str]) -> Value {
        json!({
            "storedVersions": stored,
            "conditions": [{"type": "Established", "status": "True"}],
            "acceptedNames": {"kind": "MirroredVolume", "plural": "mirroredvolumes"}
        })
    }

    /// A CRD Helm installed (no release annotation) is updated with one forced server-side apply
    /// by `tandem-operator`, carrying this binary's schema and release.
    #[tokio::test]
    async fn applies_its_crd_with_one_forced_server_side_apply() {
        let (client, verifier) = mock_client();
        let seen = verifier.run(vec![
            Call::get(PATH).reply(200, existing(&["v1alpha1"], &["v1alpha1"], None)),
            Call::patch(PATH).check_reply(|body| {
                let mut answer = body.clone();
                answer["status"] = established_status(&["v1alpha1"]);
                answer
            }),
        ]);
        let api: Api<CustomResourceDefinition> = Api::all(client);
        let outcome = apply(
            &api,
            &release("0.4.0"),
            Duration::from_secs(1),
            Duration::from_millis(10),
        )
        .await
        .unwrap();
        assert_eq!(outcome, Outcome::Applied);
        drop(api);
        let seen = finish(seen).await;
        let (method, uri, body) = &seen.calls[1];
        assert_eq!(*method, Method::PATCH);
        assert_eq!(
            uri,
            &format!("{PATH}?&force=true&fieldManager=tandem-operator")
        );
        assert_eq!(
            seen.content_types[1].as_deref(),
            Some("application/apply-patch+yaml")
        );
        let mut want = serde_json::to_value(MirroredVolume::crd()).unwrap();
        want["metadata"]["annotations"] = json!({ RELEASE_ANNOTATION: "0.4.0" });
        assert_eq!(body, &want);
    }

    /// No CRD yet (installed with --skip-crds): the same apply creates it, and the operator waits
    /// until the API server reports it Established.
    #[tokio::test]
    async fn creates_a_missing_crd_and_waits_until_established() {
        let (client, verifier) = mock_client();
        let seen = verifier.run(vec![
            Call::get(PATH).reply(404, not_found("customresourcedefinitions")),
            Call::patch(PATH),
            Call::get(PATH).reply(200, existing(&["v1alpha1"], &["v1alpha1"], Some("0.4.0"))),
        ]);
        let api: Api<CustomResourceDefinition> = Api::all(client);
        let outcome = apply(
            &api,
            &release("0.4.0"),
            Duration::from_secs(5),
            Duration::from_millis(1),
        )
        .await
        .unwrap();
        assert_eq!(outcome, Outcome::Applied);
        drop(api);
        let seen = finish(seen).await;
        assert_eq!(seen.calls.len(), 3);
    }

    /// A CRD that stores objects in a version this binary does not know (a newer release's) is
    /// refused: no write, and an error naming the version and the way out.
    #[tokio::test]
    async fn refuses_a_crd_with_an_unknown_stored_version() {
        let (client, verifier) = mock_client();
        let seen = verifier.run(vec![Call::get(PATH).reply(
            200,
            existing(
                &["v1beta1", "v1alpha1"],
                &["v1alpha1", "v1beta1"],
                Some("0.9.0"),
            ),
        )]);
        let api: Api<CustomResourceDefinition> = Api::all(client);
        let err = apply(
            &api,
            &release("0.4.0"),
            Duration::from_secs(1),
            Duration::from_millis(10),
        )
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, CrdError::UnknownVersions { unknown, .. } if unknown == &["v1beta1"]),
            "{text}"
        );
        assert!(
            text.contains("refusing to downgrade") && text.contains("--manage-crd=false"),
            "{text}"
        );
        drop(api);
        let seen = finish(seen).await;
        assert_eq!(seen.calls.len(), 1, "nothing but the read");
    }

    /// A version only stored (no longer served) counts as well: dropping it from storedVersions is
    /// the newer release's migration, not ours.
    #[test]
    fn refuses_a_version_that_is_only_stored() {
        let crd: CustomResourceDefinition =
            serde_json::from_value(existing(&["v1alpha1"], &["v1alpha1", "v1beta1"], None))
                .unwrap();
        let err = decide(Some(&crd), &release("0.4.0")).unwrap_err();
        assert!(matches!(err, CrdError::UnknownVersions { unknown, .. } if unknown == ["v1beta1"]));
    }

    /// Same versions, but a newer release applied the schema: kept (the operator runs on it), not
    /// overwritten; an equal or older release's is replaced, and so is an unstamped one (Helm's).
    #[test]
    fn keeps_a_crd_a_newer_release_applied() {
        let at = |by: Option<&str>| -> CustomResourceDefinition {
            serde_json::from_value(existing(&["v1alpha1"], &["v1alpha1"], by)).unwrap()
        };
        let ours = release("0.4.0");
        assert_eq!(
            decide(Some(&at(Some("0.5.0"))), &ours).unwrap(),
            Some("0.5.0".into())
        );
        assert_eq!(decide(Some(&at(Some("0.4.0-rc.1"))), &ours).unwrap(), None);
        assert_eq!(decide(Some(&at(Some("0.4.0"))), &ours).unwrap(), None);
        assert_eq!(decide(Some(&at(Some("0.3.9"))), &ours).unwrap(), None);
        assert_eq!(decide(Some(&at(None)), &ours).unwrap(), None);
        assert_eq!(decide(None, &ours).unwrap(), None);
        // A hand-edited annotation is not a release we can order: keep the CRD rather than guess.
        assert_eq!(
            decide(Some(&at(Some("latest"))), &ours).unwrap(),
            Some("latest".into())
        );
    }

    /// A newer release's CRD is only read, never written.
    #[tokio::test]
    async fn a_kept_crd_is_not_written() {
        let (client, verifier) = mock_client();
        let seen = verifier.run(vec![
            Call::get(PATH).reply(200, existing(&["v1alpha1"], &["v1alpha1"], Some("0.5.0")))
        ]);
        let api: Api<CustomResourceDefinition> = Api::all(client);
        let outcome = apply(
            &api,
            &release("0.4.0"),
            Duration::from_secs(1),
            Duration::from_millis(10),
        )
        .await
        .unwrap();
        assert_eq!(outcome, Outcome::KeptNewer("0.5.0".into()));
        drop(api);
        assert_eq!(finish(seen).await.calls.len(), 1);
    }
}
