//! Leader election on a `coordination.k8s.io/v1` Lease, so only one operator replica reconciles.
//!
//! The decision (create, take, renew or wait) is a pure function of the Lease and the clock; the loop
//! around it writes the Lease with optimistic concurrency (a stale `resourceVersion` loses the race).
//! A leader that cannot renew before its lease expires reports the loss; the binary then exits so a
//! restarted replica starts clean (never two reconcilers acting on the same volume).

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{api::PostParams, Api};
use tokio::sync::watch;

/// Lease settings.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub lease_name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_interval: Duration,
}

/// What to do with the Lease now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseAction {
    /// No Lease yet: create it holding it.
    Create,
    /// The Lease is free or expired: take it (a new term).
    Take,
    /// We hold it: renew.
    Renew,
    /// Someone else holds a valid lease: check again after this long.
    Wait(Duration),
}

/// Decides from the Lease's spec.
pub fn decide(
    lease: Option<&LeaseSpec>,
    me: &str,
    now: Timestamp,
    default_duration: Duration,
) -> LeaseAction {
    let Some(spec) = lease else {
        return LeaseAction::Create;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder == me {
        return LeaseAction::Renew;
    }
    if holder.is_empty() {
        return LeaseAction::Take;
    }
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
        .unwrap_or(default_duration);
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return LeaseAction::Take;
    };
    let age = now.duration_since(renewed.0);
    let age = if age.is_negative() {
        Duration::ZERO
    } else {
        age.unsigned_abs()
    };
    if age >= duration {
        LeaseAction::Take
    } else {
        LeaseAction::Wait(duration - age)
    }
}

fn held_spec(
    previous: Option<&LeaseSpec>,
    cfg: &LeaderConfig,
    now: Timestamp,
    new_term: bool,
) -> LeaseSpec {
    let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(
            i32::try_from(cfg.lease_duration.as_secs()).unwrap_or(i32::MAX),
        ),
        acquire_time: if new_term {
            Some(MicroTime(now))
        } else {
            previous.and_then(|s| s.acquire_time.clone())
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if new_term && previous.is_some() {
            transitions + 1
        } else {
            transitions
        }),
        ..Default::default()
    }
}

/// One step of the election: reads the Lease, writes it if we may. Returns whether we hold it now and how
/// long to sleep before the next step.
pub async fn step(api: &Api<Lease>, cfg: &LeaderConfig) -> Result<(bool, Duration), kube::Error> {
    let now = Timestamp::now();
    let current = api.get_opt(&cfg.lease_name).await?;
    let spec = current.as_ref().and_then(|l| l.spec.clone());
    match decide(spec.as_ref(), &cfg.identity, now, cfg.lease_duration) {
        LeaseAction::Create => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.lease_name.clone()),
                    ..Default::default()
                },
                spec: Some(held_spec(None, cfg, now, true)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok((true, cfg.renew_interval)),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok((false, Duration::from_secs(1))),
                Err(e) => Err(e),
            }
        }
        action @ (LeaseAction::Take | LeaseAction::Renew) => {
            let Some(mut lease) = current else {
                return Ok((false, Duration::from_secs(1)));
            };
            lease.spec = Some(held_spec(
                spec.as_ref(),
                cfg,
                now,
                action == LeaseAction::Take,
            ));
            match api
                .replace(&cfg.lease_name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => Ok((true, cfg.renew_interval)),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok((false, Duration::from_secs(1))),
                Err(e) => Err(e),
            }
        }
        LeaseAction::Wait(d) => Ok((false, d.min(cfg.renew_interval))),
    }
}

/// Runs the election forever, publishing leadership on `tx`. Leadership is dropped (false) when the lease
/// could not be renewed within its duration.
pub async fn run(api: Api<Lease>, cfg: LeaderConfig, tx: watch::Sender<bool>) {
    let mut last_renewed: Option<tokio::time::Instant> = None;
    loop {
        let sleep = match step(&api, &cfg).await {
            Ok((true, sleep)) => {
                last_renewed = Some(tokio::time::Instant::now());
                tx.send_replace(true);
                sleep
            }
            Ok((false, sleep)) => {
                if *tx.borrow() {
                    tracing::warn!(lease = %cfg.lease_name, "lost the leader lease to another replica");
                }
                last_renewed = None;
                tx.send_replace(false);
                sleep
            }
            Err(error) => {
                tracing::warn!(%error, lease = %cfg.lease_name, "leader lease update failed");
                let expired = last_renewed.is_none_or(|t| t.elapsed() >= cfg.lease_duration);
                if expired && *tx.borrow() {
                    tracing::error!("leader lease expired without renewal; stepping down");
                    tx.send_replace(false);
                }
                Duration::from_secs(1)
            }
        };
        tokio::time::sleep(sleep).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::SignedDuration;

    fn ago(now: Timestamp, secs: i64) -> Timestamp {
        now.checked_sub(SignedDuration::from_secs(secs)).unwrap()
    }

    fn spec(holder: &str, renewed: Timestamp, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(renewed)),
            lease_duration_seconds: Some(secs),
            ..Default::default()
        }
    }

    #[test]
    fn decisions() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let d = Duration::from_secs(15);
        assert_eq!(decide(None, "me", now, d), LeaseAction::Create);
        assert_eq!(
            decide(Some(&spec("me", ago(now, 100), 15)), "me", now, d),
            LeaseAction::Renew
        );
        assert_eq!(
            decide(Some(&spec("other", ago(now, 20), 15)), "me", now, d),
            LeaseAction::Take
        );
        assert_eq!(
            decide(Some(&spec("other", ago(now, 5), 15)), "me", now, d),
            LeaseAction::Wait(Duration::from_secs(10))
        );
        assert_eq!(
            decide(Some(&spec("", ago(now, 1), 15)), "me", now, d),
            LeaseAction::Take
        );
        // A clock behind the holder's never makes a valid lease look expired.
        assert_eq!(
            decide(Some(&spec("other", ago(now, -3), 15)), "me", now, d),
            LeaseAction::Wait(Duration::from_secs(15))
        );
    }

    #[test]
    fn new_terms_count_transitions() {
        let cfg = LeaderConfig {
            lease_name: "l".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(15),
            renew_interval: Duration::from_secs(5),
        };
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let prev = LeaseSpec {
            lease_transitions: Some(2),
            ..spec("other", ago(now, 30), 15)
        };
        let taken = held_spec(Some(&prev), &cfg, now, true);
        assert_eq!(taken.lease_transitions, Some(3));
        assert_eq!(taken.holder_identity.as_deref(), Some("me"));
        let renewed = held_spec(Some(&taken), &cfg, now, false);
        assert_eq!(renewed.lease_transitions, Some(3));
        assert_eq!(renewed.acquire_time, taken.acquire_time);
    }

    fn cfg() -> LeaderConfig {
        LeaderConfig {
            lease_name: "tandem-operator-leader".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(15),
            renew_interval: Duration::from_secs(5),
        }
    }

    fn lease_json(holder: &str, renewed: Timestamp) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "tandem-operator-leader", "namespace": "default", "resourceVersion": "7"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                     "renewTime": MicroTime(renewed), "leaseTransitions": 1}
        })
    }

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/default/leases";

    async fn step_against(
        script: Vec<crate::fixtures::Call>,
    ) -> (Result<(bool, Duration), kube::Error>, crate::fixtures::Seen) {
        let (ctx, verifier, _) = crate::controller::Context::test(Default::default());
        let handle = verifier.run(script);
        let api: Api<Lease> = Api::namespaced(ctx.client.clone(), "default");
        let result = step(&api, &cfg()).await;
        drop(api);
        drop(ctx);
        (result, crate::fixtures::finish(handle).await)
    }

    #[tokio::test]
    async fn creates_the_lease_when_missing() {
        use crate::fixtures::{not_found, Call};
        let script = vec![
            Call::get(&format!("{PATH}/tandem-operator-leader")).reply(404, not_found("lease")),
            Call::post(&format!("{PATH}?")).check(|body| {
                assert_eq!(body["spec"]["holderIdentity"], "me");
                assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
            }),
        ];
        let (result, _) = step_against(script).await;
        assert_eq!(result.unwrap(), (true, Duration::from_secs(5)));
    }

    #[tokio::test]
    async fn takes_an_expired_lease_with_optimistic_concurrency() {
        use crate::fixtures::Call;
        let expired = lease_json("other", ago(Timestamp::now(), 60));
        let script = vec![
            Call::get(&format!("{PATH}/tandem-operator-leader")).reply(200, expired),
            Call::put(&format!("{PATH}/tandem-operator-leader?")).check(|body| {
                assert_eq!(
                    body["metadata"]["resourceVersion"], "7",
                    "replace carries the version it read"
                );
                assert_eq!(body["spec"]["holderIdentity"], "me");
                assert_eq!(body["spec"]["leaseTransitions"], 2);
            }),
        ];
        let (result, _) = step_against(script).await;
        assert!(result.unwrap().0);
    }

    #[tokio::test]
    async fn loses_the_race_on_conflict_and_waits_for_a_valid_holder() {
        use crate::fixtures::Call;
        let conflict = serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                          "reason": "Conflict", "code": 409, "message": "the object has been modified"});
        let script = vec![
            Call::get(&format!("{PATH}/tandem-operator-leader"))
                .reply(200, lease_json("other", ago(Timestamp::now(), 60))),
            Call::put(&format!("{PATH}/tandem-operator-leader?")).reply(409, conflict),
        ];
        let (result, _) = step_against(script).await;
        assert_eq!(result.unwrap(), (false, Duration::from_secs(1)));

        let script = vec![Call::get(&format!("{PATH}/tandem-operator-leader"))
            .reply(200, lease_json("other", Timestamp::now()))];
        let (result, seen) = step_against(script).await;
        let (leading, wait) = result.unwrap();
        assert!(!leading && wait <= Duration::from_secs(5));
        assert_eq!(
            seen.calls.len(),
            1,
            "a valid lease held by another replica is only read"
        );
    }
}
