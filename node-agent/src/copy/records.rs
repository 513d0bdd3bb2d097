//! The records copies keep in the agent's redb, as serde JSON records: the
//! links this agent sends (table `source_links`) and the links it receives
//! with their secret hashes (table `links`). (The receiver's checkpoints
//! live with the receiver, `copy::receiver`.)
//!
//! Invariant: a record written by an older agent stays readable — before
//! this module the value was the protobuf `LinkStatus`; such a value is
//! decoded as that and written back in the new encoding at the next change
//! (read old, write new). Only what lasts is stored: never the running
//! copy's progress, last error or rate.

use cairn_api::agent::v1::{self as pb};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::{meta::LINKS, store::Store};

/// The shortest pairing secret accepted.
pub const MIN_SECRET_BYTES: usize = 16;

/// A link this agent receives (the value of the `links` table).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LinkRecord {
    /// BLAKE3 of the pairing secret, hex.
    pub(crate) secret_hash: String,
    pub(crate) target_volume: String,
    /// The newest snapshot sealed here by this link: the base of its next
    /// copy, kept until a newer one arrives.
    #[serde(default)]
    pub(crate) last_snapshot: Option<String>,
}

/// The links this agent receives, by id.
pub(crate) fn receiving_links(store: &Store) -> Result<Vec<(String, LinkRecord)>, crate::Error> {
    Ok(store
        .list_meta(LINKS)?
        .into_iter()
        .filter_map(|(k, v)| serde_json::from_slice(&v).ok().map(|r| (k, r)))
        .collect())
}

/// A link this agent sends, and its cursor (the last snapshot the target
/// has from it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceLinkRecord {
    pub link_id: String,
    pub volume_id: String,
    pub target_endpoint: String,
    /// Kept in full (hex): this end presents it.
    pub pairing_secret: String,
    #[serde(default)]
    pub policy: Option<PolicyRecord>,
    /// `SourceSelection` by its protobuf number.
    #[serde(default)]
    pub source: i32,
    /// `Compression` by its protobuf number.
    #[serde(default)]
    pub compression: i32,
    #[serde(default)]
    pub forward: bool,
    #[serde(default)]
    pub last_copied_snapshot_id: String,
    #[serde(default)]
    pub last_copied_generation: u64,
    /// Hex.
    #[serde(default)]
    pub last_copied_digest: String,
    #[serde(default)]
    pub last_copied_at_unix: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyRecord {
    /// A policy message with none of its policies set (no limit).
    Unset,
    Fixed(RateRecord),
    Windows {
        time_zone: String,
        default_rate: Option<RateRecord>,
        windows: Vec<WindowRecord>,
    },
    Adaptive {
        floor_bytes_per_sec: u64,
        ceiling_bytes_per_sec: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateRecord {
    pub unlimited: bool,
    pub bytes_per_sec: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowRecord {
    pub days: Vec<String>,
    pub start: String,
    pub end: String,
    pub rate: Option<RateRecord>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("hex of odd length {}", s.len()));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| format!("bad hex: {e}")))
        .collect()
}

impl From<&pb::Rate> for RateRecord {
    fn from(r: &pb::Rate) -> Self {
        RateRecord { unlimited: r.unlimited, bytes_per_sec: r.bytes_per_sec }
    }
}

impl From<&RateRecord> for pb::Rate {
    fn from(r: &RateRecord) -> Self {
        pb::Rate { unlimited: r.unlimited, bytes_per_sec: r.bytes_per_sec }
    }
}

fn policy_record(p: &pb::BandwidthPolicy) -> PolicyRecord {
    use pb::bandwidth_policy::Policy;
    let Some(policy) = p.policy.as_ref() else { return PolicyRecord::Unset };
    match policy {
        Policy::Fixed(r) => PolicyRecord::Fixed(r.into()),
        Policy::Windows(w) => PolicyRecord::Windows {
            time_zone: w.time_zone.clone(),
            default_rate: w.default_rate.as_ref().map(Into::into),
            windows: w
                .windows
                .iter()
                .map(|w| WindowRecord {
                    days: w.days.clone(),
                    start: w.start.clone(),
                    end: w.end.clone(),
                    rate: w.rate.as_ref().map(Into::into),
                })
                .collect(),
        },
        Policy::Adaptive(a) => PolicyRecord::Adaptive {
            floor_bytes_per_sec: a.floor_bytes_per_sec,
            ceiling_bytes_per_sec: a.ceiling_bytes_per_sec,
        },
    }
}

fn policy_pb(p: &PolicyRecord) -> pb::BandwidthPolicy {
    use pb::bandwidth_policy::Policy;
    let policy = match p {
        PolicyRecord::Unset => return pb::BandwidthPolicy { policy: None },
        PolicyRecord::Fixed(r) => Policy::Fixed(r.into()),
        PolicyRecord::Windows { time_zone, default_rate, windows } => {
            Policy::Windows(pb::BandwidthWindows {
                time_zone: time_zone.clone(),
                default_rate: default_rate.as_ref().map(Into::into),
                windows: windows
                    .iter()
                    .map(|w| pb::BandwidthWindow {
                        days: w.days.clone(),
                        start: w.start.clone(),
                        end: w.end.clone(),
                        rate: w.rate.as_ref().map(Into::into),
                    })
                    .collect(),
            })
        }
        PolicyRecord::Adaptive { floor_bytes_per_sec, ceiling_bytes_per_sec } => {
            Policy::Adaptive(pb::AdaptiveBandwidth {
                floor_bytes_per_sec: *floor_bytes_per_sec,
                ceiling_bytes_per_sec: *ceiling_bytes_per_sec,
            })
        }
    };
    pb::BandwidthPolicy { policy: Some(policy) }
}

impl SourceLinkRecord {
    /// The lasting part of a link's status (progress, last error and rate
    /// are not kept). `rec.link` is set.
    pub fn from_status(rec: &pb::LinkStatus) -> Self {
        let link = rec.link.clone().unwrap_or_default();
        SourceLinkRecord {
            link_id: link.link_id,
            volume_id: link.volume_id,
            target_endpoint: link.target_endpoint,
            pairing_secret: hex(&link.pairing_secret),
            policy: link.policy.as_ref().map(policy_record),
            source: link.source,
            compression: link.compression,
            forward: link.forward,
            last_copied_snapshot_id: rec.last_copied_snapshot_id.clone(),
            last_copied_generation: rec.last_copied_generation,
            last_copied_digest: hex(&rec.last_copied_digest),
            last_copied_at_unix: rec.last_copied_at_unix,
        }
    }

    pub fn to_status(&self) -> Result<pb::LinkStatus, String> {
        Ok(pb::LinkStatus {
            link: Some(pb::Link {
                link_id: self.link_id.clone(),
                volume_id: self.volume_id.clone(),
                target_endpoint: self.target_endpoint.clone(),
                pairing_secret: unhex(&self.pairing_secret)?.into(),
                policy: self.policy.as_ref().map(policy_pb),
                source: self.source,
                compression: self.compression,
                forward: self.forward,
            }),
            last_copied_snapshot_id: self.last_copied_snapshot_id.clone(),
            last_copied_generation: self.last_copied_generation,
            last_copied_digest: unhex(&self.last_copied_digest)?.into(),
            last_copied_at_unix: self.last_copied_at_unix,
            ..Default::default()
        })
    }
}

/// The value stored for a link.
pub fn encode_source_link(rec: &pb::LinkStatus) -> Vec<u8> {
    serde_json::to_vec(&SourceLinkRecord::from_status(rec)).expect("link records always serialize")
}

/// A stored link: a JSON record, or the protobuf `LinkStatus` an older
/// agent wrote (read old, write new).
pub fn decode_source_link(raw: &[u8]) -> Result<pb::LinkStatus, String> {
    if raw.first() == Some(&b'{') {
        let rec: SourceLinkRecord = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
        return rec.to_status();
    }
    let old = pb::LinkStatus::decode(raw).map_err(|e| e.to_string())?;
    if old.link.is_none() {
        return Err("it names no link".into());
    }
    Ok(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> pb::LinkStatus {
        pb::LinkStatus {
            link: Some(pb::Link {
                link_id: "a-to-b".into(),
                volume_id: "vol".into(),
                target_endpoint: "https://b:7400".into(),
                pairing_secret: b"0123456789abcdef\x00\xff".to_vec().into(),
                policy: Some(pb::BandwidthPolicy {
                    policy: Some(pb::bandwidth_policy::Policy::Windows(pb::BandwidthWindows {
                        time_zone: "Europe/Berlin".into(),
                        default_rate: Some(pb::Rate { unlimited: true, bytes_per_sec: 0 }),
                        windows: vec![pb::BandwidthWindow {
                            days: vec!["Mon".into(), "fri".into()],
                            start: "08:00".into(),
                            end: "".into(),
                            rate: Some(pb::Rate { unlimited: false, bytes_per_sec: 5 }),
                        }],
                    })),
                }),
                source: pb::SourceSelection::Auto as i32,
                compression: pb::Compression::Zstd as i32,
                forward: true,
            }),
            last_copied_snapshot_id: "s7".into(),
            last_copied_generation: 7,
            last_copied_digest: vec![0xab; 32].into(),
            last_copied_at_unix: 1_765_000_000,
            ..Default::default()
        }
    }

    #[test]
    fn a_link_record_written_by_an_older_agent_as_protobuf_still_reads() {
        // The bytes an agent before serde records wrote: LinkStatus.encode.
        let old = status().encode_to_vec();
        assert_eq!(decode_source_link(&old).unwrap(), status());
        // And what it reads is written back as JSON, which reads the same.
        let new = encode_source_link(&decode_source_link(&old).unwrap());
        assert_eq!(new.first(), Some(&b'{'));
        assert_eq!(decode_source_link(&new).unwrap(), status());
    }

    #[test]
    fn a_link_record_round_trips_every_policy_and_leaves_out_what_runs() {
        let mut running = status();
        running.last_error = "the receiver refused".into();
        running.current_rate_bytes_per_sec = 9;
        running.progress = Some(pb::CopyProgressResponse::default());
        assert_eq!(decode_source_link(&encode_source_link(&running)).unwrap(), status());
        let mut unset = status();
        unset.link.as_mut().unwrap().policy = Some(pb::BandwidthPolicy { policy: None });
        assert_eq!(decode_source_link(&encode_source_link(&unset)).unwrap(), unset);
        for policy in [
            None,
            Some(pb::bandwidth_policy::Policy::Fixed(pb::Rate {
                unlimited: false,
                bytes_per_sec: 0,
            })),
            Some(pb::bandwidth_policy::Policy::Adaptive(pb::AdaptiveBandwidth {
                floor_bytes_per_sec: 1,
                ceiling_bytes_per_sec: 2,
            })),
        ] {
            let mut rec = status();
            rec.link.as_mut().unwrap().policy =
                policy.map(|p| pb::BandwidthPolicy { policy: Some(p) });
            assert_eq!(decode_source_link(&encode_source_link(&rec)).unwrap(), rec);
        }
    }

    #[test]
    fn a_record_that_is_neither_encoding_is_refused() {
        assert!(decode_source_link(b"{not json").is_err());
        assert!(decode_source_link(&[0xff, 0xff, 0xff]).is_err());
    }
}
