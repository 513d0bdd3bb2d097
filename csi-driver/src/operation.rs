//! Operations in flight, one at a time per volume id. The CO normally
//! sends one call per volume at a time; when it does not (it restarted and
//! lost track), a second call on the same volume is refused at once with
//! `ABORTED`, as the CSI specification allows, instead of racing the first.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

use tonic::Status;

/// The volume ids with an operation in flight.
#[derive(Debug, Clone, Default)]
pub struct Operations(Arc<Mutex<BTreeSet<String>>>);

/// Holds a volume's slot until dropped.
#[derive(Debug)]
pub struct Running {
    set: Arc<Mutex<BTreeSet<String>>>,
    volume: String,
}

impl Operations {
    /// Starts `what` on `volume`; `ABORTED` while another operation on it
    /// runs.
    pub fn begin(&self, volume: &str, what: &str) -> Result<Running, Status> {
        let mut set = self.0.lock().unwrap();
        if !set.insert(volume.to_string()) {
            return Err(Status::aborted(format!(
                "{what}: another operation on volume {volume} is in progress; retry when it is done"
            )));
        }
        Ok(Running { set: self.0.clone(), volume: volume.to_string() })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.set.lock().unwrap().remove(&self.volume);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_operation_on_the_same_volume_is_aborted_until_the_first_ends() {
        let ops = Operations::default();
        let first = ops.begin("v1", "NodeStageVolume").unwrap();
        let e = ops.begin("v1", "NodePublishVolume").unwrap_err();
        assert_eq!(e.code(), tonic::Code::Aborted);
        assert!(e.message().contains("v1"), "{}", e.message());
        let _other = ops.begin("v2", "NodeStageVolume").unwrap();
        drop(first);
        ops.begin("v1", "NodePublishVolume").unwrap();
    }
}
