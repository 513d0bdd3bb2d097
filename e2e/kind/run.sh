#!/usr/bin/env bash
# Cairn end to end on a kind cluster: two sites, a volume written at site-a,
# snapshotted, copied to site-b, failed over there and read back, checksum
# compared.
#
#   e2e/kind/run.sh            # about 15 minutes, most of it the image build
#   KEEP=1 e2e/kind/run.sh     # keep the cluster afterwards (kubectl --context kind-cairn-e2e)
#
# Needs: docker (with BuildKit), kind (0.20 or newer), kubectl, helm (3.8 or
# newer), curl, and on the host /dev/fuse and loop devices (checked first).
# kind nodes are containers that see the host's device nodes as they were
# when the node was created: /dev/fuse must exist, and so must enough
# /dev/loopN nodes for the volumes attached (the kernel hands out the lowest
# free loop number, counting the host's own loop devices).
#
# Environment:
#   KEEP=1               keep the cluster (default: delete it, also on failure)
#   CLUSTER=name         kind cluster name (cairn-e2e)
#   SKIP_BUILD=1         use images already present locally (IMAGE_TAG below)
#   IMAGE_REGISTRY=...   image names' registry (ghcr.io/cairn-storage)
#   IMAGE_TAG=...        image tag (kind-e2e)
#   KIND_NODE_IMAGE=...  kind node image (kind's default)
#   SNAPSHOTTER_VERSION  kubernetes-csi/external-snapshotter release for the
#                        snapshot CRDs and controller (v8.6.0)
#   TIMEOUT              each wait, in seconds (600)
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER="${CLUSTER:-cairn-e2e}"
IMAGE_REGISTRY="${IMAGE_REGISTRY:-ghcr.io/cairn-storage}"
IMAGE_TAG="${IMAGE_TAG:-kind-e2e}"
SNAPSHOTTER_VERSION="${SNAPSHOTTER_VERSION:-v8.6.0}"
TIMEOUT="${TIMEOUT:-600}"
NS=cairn-system           # the release's namespace, and the CSI volumes'
APP_NS=cairn-e2e          # the test pods' namespace
CONTEXT="kind-$CLUSTER"
step_no=0

step() {
  step_no=$((step_no + 1))
  echo
  echo "==> step $step_no: $*"
}

fail() {
  echo "FAILED: $*" >&2
  exit 1
}

k() {
  kubectl --context "$CONTEXT" "$@"
}

# What a person would look at when a step fails.
diagnose() {
  echo "---- diagnostics (cluster $CLUSTER) ----" >&2
  k get nodes -o wide >&2 || true
  k get pods -A -o wide >&2 || true
  k get storageclusters,volumes,remotelinks -A >&2 || true
  k get pvc,pv,volumeattachments -A >&2 || true
  k get volumesnapshots -A >&2 || true
  k get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -40 >&2 || true
  k -n "$NS" logs deploy/cairn-operator --all-containers --tail=60 >&2 || true
  k -n "$NS" logs deploy/cairn-csi-controller -c cairn-csi --tail=60 >&2 || true
}

cleanup() {
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    diagnose
  fi
  if [[ "${KEEP:-0}" == 1 ]]; then
    echo "kept the cluster: kubectl --context $CONTEXT ...; delete it with: kind delete cluster --name $CLUSTER"
  elif kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    echo "deleting the kind cluster $CLUSTER (KEEP=1 keeps it)"
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
  exit "$rc"
}

# ---------------------------------------------------------------------------
step "preflight: tools, /dev/fuse, loop devices"
for tool in docker kind kubectl helm curl; do
  command -v "$tool" >/dev/null || fail "missing $tool: install it first (see docs/kubernetes.md)"
done
docker info >/dev/null 2>&1 || fail "docker does not answer: start the Docker engine (or add yourself to the docker group)"
[[ -c /dev/fuse ]] || fail "no /dev/fuse on this host: load the module with 'sudo modprobe fuse'"
[[ -c /dev/loop-control ]] || fail "no /dev/loop-control on this host: load the module with 'sudo modprobe loop'"
loops=$(find /dev -maxdepth 1 -name 'loop[0-9]*' -type b | wc -l)
if ((loops < 32)); then
  fail "only $loops /dev/loopN nodes on this host; kind nodes copy the host's /dev when created, so create more first:
  for i in \$(seq 0 63); do [ -e /dev/loop\$i ] || sudo mknod -m 0660 /dev/loop\$i b 7 \$i; done"
fi
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  fail "a kind cluster named $CLUSTER exists: delete it (kind delete cluster --name $CLUSTER) or set CLUSTER"
fi
echo "docker, kind, kubectl, helm; /dev/fuse; $loops loop device nodes"

image() {
  echo "$IMAGE_REGISTRY/cairn-$1:$IMAGE_TAG"
}

# ---------------------------------------------------------------------------
if [[ "${SKIP_BUILD:-0}" == 1 ]]; then
  step "images: using $(image operator), $(image agent), $(image csi) as built (SKIP_BUILD=1)"
  for t in operator agent csi; do
    docker image inspect "$(image "$t")" >/dev/null || fail "no image $(image "$t") here: build it or unset SKIP_BUILD"
  done
else
  step "build the images (Dockerfile targets operator, agent, csi)"
  for t in operator agent csi; do
    DOCKER_BUILDKIT=1 docker build --target "$t" -t "$(image "$t")" .
  done
fi

# ---------------------------------------------------------------------------
step "create the kind cluster $CLUSTER (a control plane, three workers)"
trap cleanup EXIT
kind_args=(create cluster --name "$CLUSTER" --config e2e/kind/cluster.yaml --wait 5m)
if [[ -n "${KIND_NODE_IMAGE:-}" ]]; then
  kind_args+=(--image "$KIND_NODE_IMAGE")
fi
kind "${kind_args[@]}"

step "load the images into the nodes"
for t in operator agent csi; do
  kind load docker-image --name "$CLUSTER" "$(image "$t")"
done

step "label the workers into sites: two at site-a, one at site-b"
mapfile -t workers < <(k get nodes -l '!node-role.kubernetes.io/control-plane' -o name | sort)
((${#workers[@]} == 3)) || fail "expected 3 workers, found ${#workers[@]}"
k label "${workers[0]}" "${workers[1]}" cairn.dev/site=site-a
k label "${workers[2]}" cairn.dev/site=site-b
k get nodes -L cairn.dev/site

# ---------------------------------------------------------------------------
step "install the snapshot CRDs and snapshot-controller (external-snapshotter $SNAPSHOTTER_VERSION)"
base="https://raw.githubusercontent.com/kubernetes-csi/external-snapshotter/$SNAPSHOTTER_VERSION"
for crd in volumesnapshotclasses volumesnapshotcontents volumesnapshots; do
  k apply -f "$base/client/config/crd/snapshot.storage.k8s.io_$crd.yaml"
done
k apply -f "$base/deploy/kubernetes/snapshot-controller/rbac-snapshot-controller.yaml"
k apply -f "$base/deploy/kubernetes/snapshot-controller/setup-snapshot-controller.yaml"
k -n kube-system rollout status deploy/snapshot-controller --timeout="${TIMEOUT}s"

# ---------------------------------------------------------------------------
step "helm install charts/cairn with e2e/kind/values-two-sites.yaml"
k create namespace "$NS"
# The agents and the CSI node plugin are privileged pods.
k label namespace "$NS" pod-security.kubernetes.io/enforce=privileged
helm --kube-context "$CONTEXT" install cairn charts/cairn \
  --namespace "$NS" \
  -f e2e/kind/values-two-sites.yaml \
  --set global.imageRegistry="$IMAGE_REGISTRY" \
  --set global.imageTag="$IMAGE_TAG" \
  --wait --timeout "${TIMEOUT}s"

step "wait for the rollout and for both storage clusters to be Ready"
k -n "$NS" rollout status deploy/cairn-operator --timeout="${TIMEOUT}s"
k -n "$NS" rollout status deploy/cairn-csi-controller --timeout="${TIMEOUT}s"
for site in site-a site-b; do
  k -n "$NS" rollout status "ds/cairn-agent-$site" --timeout="${TIMEOUT}s"
  k -n "$NS" rollout status "ds/cairn-csi-node-$site" --timeout="${TIMEOUT}s"
  k wait "storagecluster/$site" --for=condition=Ready --timeout="${TIMEOUT}s"
done
k get storageclusters
k get storageclass

# ---------------------------------------------------------------------------
step "at site-a: a PVC and a pod that writes a file and its checksum"
k create namespace "$APP_NS"
k apply -n "$APP_NS" -f - <<'EOF'
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: data
spec:
  storageClassName: cairn-site-a
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: 1Gi
---
apiVersion: v1
kind: Pod
metadata:
  name: writer
spec:
  restartPolicy: Never
  containers:
    - name: writer
      image: busybox:1.37
      command:
        - sh
        - -ec
        - |
          head -c 67108864 /dev/urandom > /data/payload
          cd /data && sha256sum payload > payload.sha256
          sync
          echo "sha256 $(cut -d' ' -f1 payload.sha256)"
      volumeMounts:
        - name: data
          mountPath: /data
  volumes:
    - name: data
      persistentVolumeClaim:
        claimName: data
EOF
k -n "$APP_NS" wait pod/writer --for=jsonpath='{.status.phase}'=Succeeded --timeout="${TIMEOUT}s"
written=$(k -n "$APP_NS" logs writer | sed -n 's/^sha256 //p')
[[ -n "$written" ]] || fail "the writer printed no checksum"
pv=$(k -n "$APP_NS" get pvc data -o jsonpath='{.spec.volumeName}')
source_volume=$(k get pv "$pv" -o jsonpath='{.spec.csi.volumeHandle}')
size_bytes=$(k -n "$NS" get volume "$source_volume" -o jsonpath='{.spec.sizeBytes}')
echo "wrote 64 MiB, sha256 $written, on Volume $NS/$source_volume ($size_bytes bytes)"
k -n "$NS" get volume "$source_volume"

step "a VolumeSnapshot of the PVC"
k apply -n "$APP_NS" -f - <<'EOF'
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata:
  name: data-snapshot
spec:
  volumeSnapshotClassName: cairn
  source:
    persistentVolumeClaimName: data
EOF
k -n "$APP_NS" wait volumesnapshot/data-snapshot --for=jsonpath='{.status.readyToUse}'=true --timeout="${TIMEOUT}s"
k -n "$APP_NS" get volumesnapshot data-snapshot

# ---------------------------------------------------------------------------
step "at site-b: a Remote volume, and a RemoteLink that copies the volume to it"
k apply -n "$NS" -f - <<EOF
apiVersion: cairn.dev/v1alpha1
kind: Volume
metadata:
  name: e2e-copy
spec:
  cluster: site-b
  sizeBytes: $size_bytes
  replicas: 1
  role: Remote
---
apiVersion: cairn.dev/v1alpha1
kind: RemoteLink
metadata:
  name: e2e-to-site-b
spec:
  sourceVolume: $source_volume
  targetCluster: site-b
  targetVolume: e2e-copy
  # Copy now: done when status.lastCopyRequest says the same.
  copyRequest: e2e-1
EOF

step "wait for the copy (RemoteLink status)"
# lastCopyRequest says the request was taken up (a snapshot is taken at the
# source, then copied); the copy is done when the link names the snapshot
# it copied last.
k -n "$NS" wait remotelink/e2e-to-site-b --for=jsonpath='{.status.lastCopyRequest}'=e2e-1 --timeout="${TIMEOUT}s"
copied=""
for _ in $(seq "$TIMEOUT"); do
  copied=$(k -n "$NS" get remotelink e2e-to-site-b -o jsonpath='{.status.lastCopiedSnapshot.id}')
  [[ "$copied" == copy-e2e-1 ]] && break
  sleep 1
done
[[ "$copied" == copy-e2e-1 ]] || fail "the requested copy did not finish within ${TIMEOUT}s (last copied: ${copied:-none})"
k -n "$NS" get remotelink e2e-to-site-b
echo "copied snapshot $copied to site-b"

# ---------------------------------------------------------------------------
step "fail over: pause the link, promote the site-b volume (spec.role: Primary)"
k -n "$NS" patch remotelink e2e-to-site-b --type merge -p '{"spec":{"paused":true}}'
k -n "$NS" patch volume e2e-copy --type merge -p '{"spec":{"role":"Primary"}}'
k -n "$NS" wait volume/e2e-copy --for=jsonpath='{.status.role}'=Primary --timeout="${TIMEOUT}s"
k -n "$NS" wait volume/e2e-copy --for=jsonpath='{.status.phase}'=Ready --timeout="${TIMEOUT}s"
k -n "$NS" get volume e2e-copy

step "at site-b: a static PV on the promoted volume, a PVC bound to it, a pod that reads the file back"
k apply -f - <<EOF
apiVersion: v1
kind: PersistentVolume
metadata:
  name: e2e-failover
spec:
  capacity:
    storage: 1Gi
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  volumeMode: Filesystem
  claimRef:
    namespace: $APP_NS
    name: data-site-b
  csi:
    driver: csi.cairn.dev
    volumeHandle: e2e-copy
    fsType: ext4
  # The volume lives at site-b: its pods run there.
  nodeAffinity:
    required:
      nodeSelectorTerms:
        - matchExpressions:
            - key: topology.cairn.dev/cluster
              operator: In
              values: [site-b]
EOF
k apply -n "$APP_NS" -f - <<'EOF'
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: data-site-b
spec:
  storageClassName: ""
  volumeName: e2e-failover
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: 1Gi
---
apiVersion: v1
kind: Pod
metadata:
  name: reader
spec:
  restartPolicy: Never
  containers:
    - name: reader
      image: busybox:1.37
      command:
        - sh
        - -ec
        - |
          cd /data && sha256sum -c payload.sha256
          echo "sha256 $(sha256sum payload | cut -d' ' -f1)"
      volumeMounts:
        - name: data
          mountPath: /data
  volumes:
    - name: data
      persistentVolumeClaim:
        claimName: data-site-b
EOF
k -n "$APP_NS" wait pod/reader --for=jsonpath='{.status.phase}'=Succeeded --timeout="${TIMEOUT}s"
read_back=$(k -n "$APP_NS" logs reader | sed -n 's/^sha256 //p')
node=$(k -n "$APP_NS" get pod reader -o jsonpath='{.spec.nodeName}')
echo "read back on $node: sha256 $read_back"
[[ "$read_back" == "$written" ]] || fail "checksum differs: wrote $written at site-a, read $read_back at site-b"

step "done: the file written at site-a was read back at site-b after failover, checksum equal"
