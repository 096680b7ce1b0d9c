#!/usr/bin/env bash
# Builds Tartan's container image as an OCI archive, without a container daemon or builder:
#   bash scripts/build-image.sh [--tag TAG] [--out FILE] [--no-build]
# (--no-build takes the release binaries already in target/, as the tests do after scripts/test.sh built them.)
# The image holds the static release binaries (the plugin; the agent and the proxy as one multi-call binary,
# tartan-node), the netfilter tools they call
# (iptables with both backends behind a wrapper that picks the host's, ipset, conntrack) and busybox's sh for
# that wrapper, all from Debian packages at the versions apt has. One layer, written as a deterministic tar: the
# same binaries and packages give the same digest (every timestamp is the commit's time, owners are root, entries
# are sorted, gzip carries no name or time).
# Load it with `podman load -i FILE` or `ctr images import FILE`; push it with `skopeo copy oci-archive:FILE ...`.
set -euo pipefail
cd "$(dirname "$0")/.."
# File modes in the layer come from here, not from whoever runs the build.
umask 022
for tool in file ldd dpkg-deb apt-get strip python3; do
  command -v "$tool" >/dev/null || { echo "build-image: $tool is needed (scripts/setup.sh installs it)" >&2; exit 1; }
done

TAG=""
OUT=""
BUILD=1
while (($#)); do
  case "$1" in
    --tag) TAG="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    *) echo "usage: $0 [--tag TAG] [--out FILE] [--no-build]" >&2; exit 2 ;;
  esac
done
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
TAG=${TAG:-$VERSION}
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
SOURCE=${TARTAN_IMAGE_SOURCE:-$(git config --get remote.origin.url 2>/dev/null || echo tartan)}
# A clone URL may carry credentials (https://user:token@host/...): never into a label.
SOURCE=$(printf '%s' "$SOURCE" | sed -E 's#^([a-z+]+://)[^/@]*@#\1#')
# The commit's time, so that rebuilding the same commit gives the same image.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
WORK=target/image
OUT=${OUT:-$WORK/tartan-$TAG.oci.tar}
BIN=target/x86_64-unknown-linux-gnu/release

# The same command as scripts/test.sh, so that one build serves both.
if ((BUILD)); then
  cargo build --release --bins --locked >&2
fi
for b in tartan tartan-node; do
  [ -x "$BIN/$b" ] || { echo "build-image: $BIN/$b is missing (run without --no-build)" >&2; exit 1; }
done

# The packages the tools come from (with their libraries); apt resolves the versions, recorded in the image.
PACKAGES=(libc6 iptables libxtables12 libip4tc2 libip6tc2 libnftnl11 libmnl0 libnfnetlink0 libnetfilter-conntrack3
  ipset libipset13 conntrack libnetfilter-cttimeout1 libnetfilter-cthelper0 libnetfilter-queue1 busybox-static)
mkdir -p "$WORK/debs"
need=()
for p in "${PACKAGES[@]}"; do
  v=$(apt-cache policy "$p" | sed -n 's/^  Candidate: //p')
  if [ -z "$v" ] || [ "$v" = "(none)" ]; then
    apt-get update -qq
    v=$(apt-cache policy "$p" | sed -n 's/^  Candidate: //p')
  fi
  [ -n "$(ls "$WORK/debs/${p}_"*"${v#*:}"_*.deb 2>/dev/null)" ] || need+=("$p=$v")
done
if ((${#need[@]})); then
  (cd "$WORK/debs" && apt-get download -qq "${need[@]}")
fi

ROOT=$WORK/rootfs
rm -rf "$ROOT"
mkdir -p "$ROOT"
: > "$WORK/packages.txt"
for p in "${PACKAGES[@]}"; do
  v=$(apt-cache policy "$p" | sed -n 's/^  Candidate: //p')
  deb=$(ls "$WORK/debs/${p}_"*"${v#*:}"_*.deb | head -1)
  dpkg-deb -x "$deb" "$ROOT"
  echo "$p $v" >> "$WORK/packages.txt"
done
# What a container never uses: documentation, locales, charset converters, the libc tools, and tools of the
# packages that nothing here calls.
rm -rf "$ROOT"/usr/share/{doc,man,info,locale,lintian,bug} "$ROOT"/usr/lib/x86_64-linux-gnu/{gconv,audit} \
  "$ROOT"/usr/bin "$ROOT"/sbin/ldconfig "$ROOT"/usr/sbin/{iconvconfig,zdump,nfnl_osf,xtables-monitor} \
  "$ROOT"/usr/sbin/{arptables,ebtables}-* "$ROOT"/usr/sbin/*-apply "$ROOT"/usr/sbin/*-translate \
  "$ROOT"/usr/share/iptables "$ROOT"/etc/{ld.so.conf.d,ld.so.conf,bindresvport.blacklist,gai.conf} \
  "$ROOT"/usr/libexec "$ROOT"/usr/lib/x86_64-linux-gnu/libnss_* "$ROOT"/usr/lib/x86_64-linux-gnu/*.a
# Of the libraries, only those something here links (ldd resolves them with the host's, the same Debian release).
keep=$(find "$ROOT" -type f \( -perm -u+x -o -name '*.so*' \) -exec sh -c 'file -b "$1" | grep -q "ELF.*dynamic" && ldd "$1"' _ {} \; 2>/dev/null |
  awk '/=>/ {print $1} /ld-linux/ {print $1}' | xargs -rn1 basename | sort -u)
if [ -z "$keep" ] || ! echo "$keep" | grep -qxF libc.so.6; then
  echo "build-image: found no linked libraries (ldd failed?); refusing to build an image without them" >&2
  exit 1
fi
libs=("$ROOT"/lib/x86_64-linux-gnu/* "$ROOT"/usr/lib/x86_64-linux-gnu/lib*)
for lib in "${libs[@]}"; do  # a kept soname's link keeps the file it names
  if [ -L "$lib" ] && echo "$keep" | grep -qxF "$(basename "$lib")"; then keep+=$'\n'$(basename "$(readlink "$lib")"); fi
done
for lib in "${libs[@]}"; do
  echo "$keep" | grep -qxF "$(basename "$lib")" || rm -f "$lib"
done
mkdir -p "$ROOT"/usr/share/tartan "$ROOT"/usr/local/bin "$ROOT"/bin "$ROOT"/tmp "$ROOT"/run "$ROOT"/etc
mv "$WORK/packages.txt" "$ROOT/usr/share/tartan/debian-packages.txt"
# busybox as /bin/sh and the few commands the wrapper and a person debugging by hand use.
mv "$ROOT/bin/busybox" "$ROOT/bin/busybox.keep" 2>/dev/null || true
find "$ROOT/bin" -mindepth 1 ! -name busybox.keep -delete
mv "$ROOT/bin/busybox.keep" "$ROOT/bin/busybox"
for a in sh ln mv grep cat ls; do ln -s busybox "$ROOT/bin/$a"; done
install -m 0755 deploy/image/iptables-wrapper "$ROOT/usr/sbin/iptables-wrapper"
# Every name goes through one link, which the wrapper switches to the chosen backend on the first call.
ln -sf iptables-wrapper "$ROOT/usr/sbin/.iptables-backend"
for n in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
  ln -sf .iptables-backend "$ROOT/usr/sbin/$n"
done
for b in tartan tartan-node; do
  # Symbols are of no use in the image (the eBPF object inside the proxy is data, untouched by strip).
  strip --strip-all -o "$ROOT/usr/local/bin/$b" "$BIN/$b"
done
# The agent and the proxy are one binary here (tartan-node: they share most of their code), started by these names.
ln -s tartan-node "$ROOT/usr/local/bin/tartan-agent"
ln -s tartan-node "$ROOT/usr/local/bin/tartan-proxy"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$ROOT/etc/passwd"
printf 'root:x:0:\n' > "$ROOT/etc/group"
chmod 1777 "$ROOT/tmp"

mkdir -p "$(dirname "$OUT")"
python3 - "$ROOT" "$OUT" "$TAG" "$VERSION" "$REVISION" "$SOURCE" <<'PY'
import gzip, hashlib, io, json, os, sys, tarfile, time

root, out, tag, version, revision, source = sys.argv[1:]
name = "localhost/tartan:" + tag
epoch = int(os.environ["SOURCE_DATE_EPOCH"])
created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))

def entries(top):
    for d, dirs, files in os.walk(top):
        dirs.sort()
        for n in sorted(dirs + files):
            yield os.path.join(d, n)

def normalise(ti):
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.mtime = epoch
    return ti

# The layer: the root filesystem, sorted, owned by root, every time the commit's.
raw = io.BytesIO()
with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
    for path in sorted(entries(root)):
        t.add(path, arcname=os.path.relpath(path, root), recursive=False, filter=normalise)
layer_tar = raw.getvalue()
gz = io.BytesIO()
with gzip.GzipFile(fileobj=gz, mode="wb", compresslevel=9, mtime=0, filename="") as g:
    g.write(layer_tar)
layer = gz.getvalue()

def digest(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()

labels = {
    "org.opencontainers.image.title": "tartan",
    "org.opencontainers.image.description":
        "Tartan: CNI plugin, flannel-compatible agent and kube-proxy replacement (iptables and eBPF)",
    "org.opencontainers.image.version": version,
    "org.opencontainers.image.revision": revision,
    "org.opencontainers.image.source": source,
    "org.opencontainers.image.licenses": "Apache-2.0",
    "org.opencontainers.image.created": created,
}
config = {
    "created": created,
    "architecture": "amd64",
    "os": "linux",
    "config": {
        "Env": ["PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Entrypoint": ["/usr/local/bin/tartan-agent"],
        "WorkingDir": "/",
        "Labels": labels,
    },
    "rootfs": {"type": "layers", "diff_ids": [digest(layer_tar)]},
    "history": [{"created": created, "created_by": "scripts/build-image.sh"}],
}
def canon(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
config_b = canon(config)
manifest = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(config_b),
               "size": len(config_b)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(layer),
                "size": len(layer)}],
    "annotations": {k: v for k, v in labels.items() if k != "org.opencontainers.image.description"},
}
manifest_b = canon(manifest)
index = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": digest(manifest_b),
        "size": len(manifest_b),
        # The name podman (the first) and containerd's ctr (the second) give the image when they load it.
        "annotations": {"org.opencontainers.image.ref.name": name, "io.containerd.image.name": name},
    }],
}
files = [("oci-layout", canon({"imageLayoutVersion": "1.0.0"})), ("index.json", canon(index))]
for b in (layer, config_b, manifest_b):
    files.append(("blobs/sha256/" + digest(b).split(":")[1], b))
tmp = out + ".tmp"
with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as t:
    for d in ("blobs", "blobs/sha256"):
        ti = normalise(tarfile.TarInfo(d))
        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
        t.addfile(ti)
    for path, b in files:
        ti = normalise(tarfile.TarInfo(path))
        ti.size, ti.mode = len(b), 0o644
        t.addfile(ti, io.BytesIO(b))
os.replace(tmp, out)
print(json.dumps({"archive": out, "image": name, "manifest": digest(manifest_b),
                  "layer_bytes_compressed": len(layer), "rootfs_bytes": len(layer_tar)}))
PY
