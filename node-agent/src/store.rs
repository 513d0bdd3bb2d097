//! The replica store of one agent: the data dir's metadata database and the
//! replicas in it. Layout: `<data-dir>/meta.redb` (all metadata) and
//! `<data-dir>/volumes/<volume>/<layer>.layer` (block data).
//!
//! Invariant: a replica exists exactly when its record is committed; a
//! directory without a record (a create or delete cut short) is removed when
//! the store opens.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use cairn_api::{ChunkSet, Geometry, VolumeId};

use crate::{
    disk::{Disk, RedbBackend},
    error::{Error, Result, meta},
    meta::{BLOCKS, CHUNK_ACC, REPLICAS, encode_record, load_records},
    replica::{
        Replica,
        stream::{Listed, StreamedBlock},
    },
};

/// Bytes of metadata pages redb may cache. Block indexes live in the
/// replicas' own memory, so a small cache suffices.
const META_CACHE_BYTES: usize = 16 << 20;

/// Capacity and use of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStat {
    pub capacity_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
}

#[derive(Debug)]
pub struct Store {
    disk: Arc<dyn Disk>,
    root: PathBuf,
    db: Arc<redb::Database>,
    replicas: RwLock<BTreeMap<VolumeId, Arc<Replica>>>,
}

impl Store {
    /// Opens (or creates) the store in `root` and loads every replica.
    pub fn open(disk: Arc<dyn Disk>, root: &Path) -> Result<Self> {
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::StoreIo { op, path, source }
        };
        let volumes = root.join("volumes");
        disk.create_dir_all(&volumes).map_err(io("creating the data dir", &volumes))?;
        let db_path = root.join("meta.redb");
        let fresh = !disk.exists(&db_path);
        let file = disk.open(&db_path, true).map_err(io("opening the metadata file", &db_path))?;
        let db = redb::Builder::new()
            .set_cache_size(META_CACHE_BYTES)
            .create_with_backend(RedbBackend(file))
            .map_err(meta("opening the metadata database"))?;
        if fresh {
            disk.sync_dir(root).map_err(io("syncing the data dir", root))?;
            disk.sync_dir(root.parent().unwrap_or(root)).ok();
        }
        let db = Arc::new(db);
        let mut replicas = BTreeMap::new();
        for (name, record) in load_records(&db).map_err(meta("listing replicas"))? {
            let volume = VolumeId::new(&name).map_err(|e| Error::Corrupt {
                volume: name.clone(),
                detail: format!("recorded volume id is invalid: {e}"),
            })?;
            let record = record.map_err(|e| Error::Corrupt {
                volume: name.clone(),
                detail: format!("replica record does not parse: {e}"),
            })?;
            let dir = volumes.join(volume.as_str());
            let replica = Replica::load(volume.clone(), dir, disk.clone(), db.clone(), record)?;
            replicas.insert(volume, Arc::new(replica));
        }
        let mut tidied = false;
        for name in disk.list_dir(&volumes).map_err(io("listing volumes", &volumes))? {
            if !VolumeId::new(&name).is_ok_and(|v| replicas.contains_key(&v)) {
                let path = volumes.join(&name);
                tracing::warn!(path = %path.display(), "removing a replica directory without a record");
                disk.remove_dir_all(&path).map_err(io("removing an orphan directory", &path))?;
                tidied = true;
            }
        }
        if tidied {
            disk.sync_dir(&volumes).map_err(io("syncing the volumes dir", &volumes))?;
        }
        Ok(Store { disk, root: root.to_path_buf(), db, replicas: RwLock::new(replicas) })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Durably sets (`Some`) or removes (`None`) `key` in one of the small
    /// tables beside the replicas (remote-copy links and checkpoints).
    pub fn put_meta(
        &self,
        table: redb::TableDefinition<&str, &[u8]>,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<()> {
        let tx = self.db.begin_write().map_err(meta("writing copy metadata"))?;
        {
            let mut t = tx.open_table(table).map_err(meta("writing copy metadata"))?;
            match value {
                Some(v) => drop(t.insert(key, v).map_err(meta("writing copy metadata"))?),
                None => drop(t.remove(key).map_err(meta("writing copy metadata"))?),
            }
        }
        tx.commit().map_err(meta("writing copy metadata"))
    }

    /// Reads `key` from one of the small tables (see [`Store::put_meta`]).
    pub fn get_meta(
        &self,
        table: redb::TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<Vec<u8>>> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read().map_err(meta("reading copy metadata"))?;
        let t = match tx.open_table(table) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(meta("reading copy metadata")(e)),
        };
        Ok(t.get(key).map_err(meta("reading copy metadata"))?.map(|v| v.value().to_vec()))
    }

    /// Every key and value of one of the small tables.
    pub fn list_meta(
        &self,
        table: redb::TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        use redb::{ReadableDatabase, ReadableTable};
        let tx = self.db.begin_read().map_err(meta("reading copy metadata"))?;
        let t = match tx.open_table(table) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(meta("reading copy metadata")(e)),
        };
        let mut out = Vec::new();
        for row in t.iter().map_err(meta("reading copy metadata"))? {
            let (k, v) = row.map_err(meta("reading copy metadata"))?;
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn dir(&self, volume: &VolumeId) -> PathBuf {
        self.root.join("volumes").join(volume.as_str())
    }

    /// Creates a replica; a repeat with the same geometry and chunks returns
    /// the existing one.
    pub fn create_replica(
        &self,
        volume: &VolumeId,
        geometry: Geometry,
        chunks: ChunkSet,
    ) -> Result<Arc<Replica>> {
        chunks
            .check(&geometry)
            .map_err(|source| Error::Geometry { volume: volume.clone(), source })?;
        let mut replicas = self.replicas.write().unwrap();
        if let Some(r) = replicas.get(volume) {
            let info = r.info();
            if info.geometry == geometry && info.chunks == chunks {
                return Ok(r.clone());
            }
            return Err(Error::ReplicaExists {
                volume: volume.clone(),
                existing: format!(
                    "size {} bytes, chunk size {} bytes and {:?}",
                    info.geometry.size(),
                    info.geometry.chunk_size(),
                    info.chunks
                ),
            });
        }
        let r = Arc::new(Replica::create(
            volume.clone(),
            self.dir(volume),
            self.disk.clone(),
            self.db.clone(),
            geometry,
            chunks,
        )?);
        replicas.insert(volume.clone(), r.clone());
        Ok(r)
    }

    pub fn replica(&self, volume: &VolumeId) -> Result<Arc<Replica>> {
        self.replicas
            .read()
            .unwrap()
            .get(volume)
            .cloned()
            .ok_or_else(|| Error::ReplicaNotFound { volume: volume.clone() })
    }

    /// Reloads a replica from disk and checks it; a replica that stopped
    /// serving after an error serves again if this succeeds.
    pub fn open_replica(&self, volume: &VolumeId) -> Result<Arc<Replica>> {
        let mut replicas = self.replicas.write().unwrap();
        if !replicas.contains_key(volume) {
            return Err(Error::ReplicaNotFound { volume: volume.clone() });
        }
        let record = load_records(&self.db)
            .map_err(meta("reopening a replica"))?
            .into_iter()
            .find(|(n, _)| n == volume.as_str())
            .ok_or_else(|| Error::ReplicaNotFound { volume: volume.clone() })?
            .1
            .map_err(|e| Error::Corrupt { volume: volume.to_string(), detail: e.to_string() })?;
        self.reload(&mut replicas, volume, record, None)
    }

    /// Loads `volume` from `record` and its files and puts it in place of
    /// the handle it had, which is retired: nothing may go through a handle
    /// whose in-memory state the disk no longer matches. The reloaded
    /// replica gets a new incarnation unless `keep` names one (a reload
    /// after a head's own change, which lost nothing the head wrote).
    fn reload(
        &self,
        replicas: &mut BTreeMap<VolumeId, Arc<Replica>>,
        volume: &VolumeId,
        record: crate::meta::ReplicaRecord,
        keep: Option<u64>,
    ) -> Result<Arc<Replica>> {
        let mut r = Replica::load(
            volume.clone(),
            self.dir(volume),
            self.disk.clone(),
            self.db.clone(),
            record,
        )?;
        if let Some(incarnation) = keep {
            r.incarnation = incarnation;
        }
        let r = Arc::new(r);
        if let Some(old) = replicas.insert(volume.clone(), r.clone()) {
            old.retire("the replica was reloaded from disk; this handle is stale");
        }
        Ok(r)
    }

    /// Reverts the head to the newest snapshot (to empty if there is none):
    /// every write since the last seal, flushed or not, is dropped. One
    /// commit replaces the head layer's record by a fresh, empty head and
    /// drops the old head's block records; then the replica is reloaded
    /// from disk, which removes the old head's file. A crash before the
    /// commit leaves the head as it was durably; after it, reverted.
    /// Refused below the admitted epoch, like a write.
    pub fn revert_head(&self, volume: &VolumeId, epoch: u64) -> Result<Arc<Replica>> {
        let mut replicas = self.replicas.write().unwrap();
        let Some(replica) = replicas.get(volume).cloned() else {
            return Err(Error::ReplicaNotFound { volume: volume.clone() });
        };
        let record = {
            let mut st = replica.write_state()?;
            replica.admit(&mut st, epoch)?;
            if st.head().map.is_empty() && st.pending.is_empty() {
                // Nothing since the newest snapshot: nothing to drop.
                return Ok(replica.clone());
            }
            let old_head = st.head().no;
            let mut record = st.record();
            let head = record.layers.last_mut().expect("a replica has a head");
            head.no = record.next_layer;
            record.next_layer += 1;
            let v = volume.as_str();
            const OP: &str = "reverting the head";
            let tx = self.db.begin_write().map_err(meta(OP))?;
            {
                tx.open_table(REPLICAS)
                    .map_err(meta(OP))?
                    .insert(v, &encode_record(&record)[..])
                    .map_err(meta(OP))?;
                let mut t = tx.open_table(BLOCKS).map_err(meta(OP))?;
                t.retain_in((v, old_head, 0)..=(v, old_head, u64::MAX), |_, _| false)
                    .map_err(meta(OP))?;
            }
            tx.commit().map_err(meta(OP)).map_err(|e| replica.fail(e))?;
            record
        };
        // The head asked for this revert: the replica holds what it wrote
        // (nothing since the snapshot), so it keeps its incarnation.
        self.reload(&mut replicas, volume, record, Some(replica.incarnation))
    }

    /// Deletes a replica: one commit drops its records, then its directory
    /// goes.
    pub fn delete_replica(&self, volume: &VolumeId) -> Result<()> {
        let mut replicas = self.replicas.write().unwrap();
        let Some(replica) = replicas.get(volume).cloned() else {
            return Err(Error::ReplicaNotFound { volume: volume.clone() });
        };
        // Hold the replica's lock so no write lands after its records go.
        let _guard = replica.state.write().unwrap_or_else(|p| p.into_inner());
        let v = volume.as_str();
        let tx = self.db.begin_write().map_err(meta("deleting a replica"))?;
        {
            tx.open_table(REPLICAS)
                .map_err(meta("deleting a replica"))?
                .remove(v)
                .map_err(meta("deleting a replica"))?;
            let mut t = tx.open_table(BLOCKS).map_err(meta("deleting a replica"))?;
            t.retain_in((v, 0, 0)..=(v, u64::MAX, u64::MAX), |_, _| false)
                .map_err(meta("deleting a replica"))?;
            let mut a = tx.open_table(CHUNK_ACC).map_err(meta("deleting a replica"))?;
            a.retain_in((v, 0)..=(v, u64::MAX), |_, _| false)
                .map_err(meta("deleting a replica"))?;
        }
        tx.commit().map_err(meta("deleting a replica"))?;
        replicas.remove(volume);
        let dir = self.dir(volume);
        self.disk.remove_dir_all(&dir).map_err(|source| Error::StoreIo {
            op: "removing a replica directory",
            path: dir.clone(),
            source,
        })?;
        Ok(())
    }

    /// Every replica, in volume order.
    pub fn replicas(&self) -> Vec<Arc<Replica>> {
        self.replicas.read().unwrap().values().cloned().collect()
    }

    /// Flushes every serving replica (at shutdown).
    pub fn flush_all(&self) -> Result<()> {
        let mut first = Ok(());
        for r in self.replicas() {
            if let Err(e) = r.flush_admitted() {
                tracing::error!(volume = %r.volume(), error = %e, "flush failed");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    pub fn stat(&self) -> Result<StoreStat> {
        let (capacity_bytes, available_bytes) =
            self.disk.capacity(&self.root).map_err(|source| Error::StoreIo {
                op: "reading file system capacity",
                path: self.root.clone(),
                source,
            })?;
        let used_bytes = self.replicas().iter().map(|r| r.info().used_bytes).sum();
        Ok(StoreStat { capacity_bytes, available_bytes, used_bytes })
    }
}

/// Streams blocks of `volume` one chunk at a time from the blocking pool, in
/// batches of `batch` blocks, so memory stays bounded by one chunk's
/// listing whatever the volume size. The first error ends the stream.
pub fn spawn_stream(
    store: Arc<Store>,
    volume: cairn_api::VolumeId,
    chunks: Vec<u64>,
    batch: usize,
    list: impl Fn(&Replica, &[u64]) -> Result<Vec<Listed>> + Send + 'static,
) -> tokio::sync::mpsc::Receiver<Result<Vec<StreamedBlock>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let send_err = |e: Error| drop(tx.blocking_send(Err(e)));
        let replica = match store.replica(&volume) {
            Ok(r) => r,
            Err(e) => return send_err(e),
        };
        let chunks = match replica.stream_chunks(&chunks) {
            Ok(c) => c,
            Err(e) => return send_err(e),
        };
        for chunk in chunks {
            let items = match list(&replica, &[chunk]) {
                Ok(items) => items,
                Err(e) => return send_err(e),
            };
            for part in items.chunks(batch) {
                let msg = replica.read_listed(part);
                let failed = msg.is_err();
                if tx.blocking_send(msg).is_err() || failed {
                    return;
                }
            }
        }
    });
    rx
}
