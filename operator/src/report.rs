//! What reconcilers tell people: status written by server-side apply on
//! `/status` under one field manager, events on the object, and times in
//! the API's form. One place, so every controller reports alike.

use std::fmt::Debug;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    Api, Resource,
    api::{Patch, PatchParams},
    runtime::events::{Event, EventType},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;

use crate::context::Context;

/// The field manager of every write the operator makes.
pub const MANAGER: &str = "cairn-operator";

/// The API's time (k8s-openapi's jiff) from ours.
pub fn k8s_time(t: Timestamp) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(t.as_second()).expect("in range"))
}

/// Ours from the API's.
pub fn from_k8s_time(t: &Time) -> Timestamp {
    Timestamp::from_second(t.0.as_second()).expect("in range")
}

/// Now, in the API's form.
pub fn now() -> Time {
    k8s_time(Timestamp::now())
}

/// Writes `status` of object `name` by server-side apply on `/status`.
pub async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    status: &impl Serialize,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let body = json!({ "apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": status });
    api.patch_status(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&body)).await?;
    Ok(())
}

/// Writes `status` of object `name` by server-side apply on `/status`,
/// only if the object is still at `resource_version` (else the API server
/// answers 409 Conflict and nothing is written): a write that must not
/// race another writer's.
pub async fn apply_status_at<K>(
    api: &Api<K>,
    name: &str,
    resource_version: &str,
    status: &impl Serialize,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let body = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": { "resourceVersion": resource_version },
        "status": status,
    });
    api.patch_status(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&body)).await?;
    Ok(())
}

/// Publishes an event on `obj` (a failure to publish is logged, not
/// fatal: the status says the same).
pub async fn event<K>(
    ctx: &Context,
    obj: &K,
    action: &str,
    type_: EventType,
    reason: &str,
    note: String,
) where
    K: Resource<DynamicType = ()>,
{
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &obj.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish an event");
    }
}
