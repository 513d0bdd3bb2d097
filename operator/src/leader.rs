//! Leader election: several operator replicas run, only the holder of the
//! Lease `cairn-operator-leader` reconciles. The holder renews it every
//! third of its duration; a replica takes it over once it has not been
//! renewed for the whole duration, so a new leader takes over within one
//! lease duration (plus one retry period).
//!
//! Invariants: every write of the Lease carries the resourceVersion read
//! (a create carries none), so two replicas racing for it cannot both win:
//! the API server refuses the second with a conflict. A leader that fails to
//! renew before its lease runs out stops (the process exits and is
//! restarted as a follower), so two leaders never act at once for longer
//! than the clock skew.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

/// The Lease's name.
pub const LEASE: &str = "cairn-operator-leader";
/// How long a lease lasts without renewal.
pub const DURATION: Duration = Duration::from_secs(15);

/// What a replica does about the Lease it read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it: create it.
    Create,
    /// It is ours: renew it.
    Renew,
    /// Its holder let it expire: take it over.
    TakeOver { from: String },
    /// Another replica holds it: wait.
    Wait { holder: String },
}

/// Pure: the decision from the Lease as read (None: there is none).
pub fn decide(lease: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease else { return Decision::Create };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == me {
        return Decision::Renew;
    }
    let duration = spec.lease_duration_seconds.unwrap_or(DURATION.as_secs() as i32) as i64;
    let renewed = spec.renew_time.as_ref().map(|t| t.0.as_second());
    match renewed {
        Some(r) if now.as_second() - r <= duration && !holder.is_empty() => {
            Decision::Wait { holder }
        }
        _ => Decision::TakeOver { from: holder },
    }
}

fn micro_now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::from_second(Timestamp::now().as_second()).expect("now"))
}

/// One attempt: reads the Lease and acts on [`decide`]. Returns whether
/// this replica holds it afterwards.
pub async fn try_lead(client: &Client, namespace: &str, me: &str) -> Result<bool, kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let current = api.get_opt(LEASE).await?;
    let decision = decide(current.as_ref().and_then(|l| l.spec.as_ref()), me, Timestamp::now());
    let spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(DURATION.as_secs() as i32),
        acquire_time: acquired.or_else(|| Some(micro_now())),
        renew_time: Some(micro_now()),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    let write = |mut lease: Lease, new: LeaseSpec| {
        lease.spec = Some(new);
        lease
    };
    let result = match (decision, current) {
        (Decision::Wait { holder }, _) => {
            tracing::debug!(%holder, "another replica leads");
            return Ok(false);
        }
        (Decision::Create, _) => {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(LEASE.into()), ..Default::default() },
                spec: Some(spec(0, None)),
            };
            api.create(&PostParams::default(), &lease).await.map(drop)
        }
        (Decision::Renew, Some(l)) => {
            let old = l.spec.clone().unwrap_or_default();
            let new = spec(old.lease_transitions.unwrap_or(0), old.acquire_time.clone());
            api.replace(LEASE, &PostParams::default(), &write(l, new)).await.map(drop)
        }
        (Decision::TakeOver { from }, Some(l)) => {
            tracing::warn!(%from, "taking over the lead: the lease expired");
            let t = l.spec.as_ref().and_then(|s| s.lease_transitions).unwrap_or(0) + 1;
            api.replace(LEASE, &PostParams::default(), &write(l, spec(t, None))).await.map(drop)
        }
        (_, None) => return Ok(false),
    };
    match result {
        Ok(()) => Ok(true),
        // Another replica wrote first: it leads.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Waits until this replica leads, then keeps renewing in the background;
/// the returned future ends (and the caller should exit) if the lead is
/// lost.
pub async fn lead(client: Client, namespace: String, me: String) -> impl Future<Output = ()> {
    let retry = DURATION / 3;
    loop {
        match try_lead(&client, &namespace, &me).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the leader lease"),
        }
        tokio::time::sleep(retry).await;
    }
    tracing::info!(%me, "leading");
    async move {
        let mut last_ok = std::time::Instant::now();
        loop {
            tokio::time::sleep(retry).await;
            match try_lead(&client, &namespace, &me).await {
                Ok(true) => last_ok = std::time::Instant::now(),
                Ok(false) => {
                    tracing::error!("lost the lead to another replica");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not renew the leader lease");
                    if last_ok.elapsed() >= DURATION {
                        tracing::error!("the leader lease ran out");
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(by: &str, secs_ago: i64) -> LeaseSpec {
        let t = Timestamp::now().as_second() - secs_ago;
        LeaseSpec {
            holder_identity: Some(by.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::from_second(t).unwrap())),
            ..Default::default()
        }
    }

    #[test]
    fn the_holder_renews_others_wait_and_an_expired_lease_is_taken_over() {
        let now = Timestamp::now();
        assert_eq!(decide(None, "op-1", now), Decision::Create);
        assert_eq!(decide(Some(&held("op-1", 3)), "op-1", now), Decision::Renew);
        assert_eq!(
            decide(Some(&held("op-2", 3)), "op-1", now),
            Decision::Wait { holder: "op-2".into() }
        );
        assert_eq!(
            decide(Some(&held("op-2", 16)), "op-1", now),
            Decision::TakeOver { from: "op-2".into() }
        );
    }
}
