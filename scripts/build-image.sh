#!/usr/bin/env bash
# Build the container image from the Containerfile with podman, without any image registry:
#
#   1. the base: a Debian bookworm root filesystem with Debian's python3, made by mmdebstrap
#      from Debian's packages and imported into podman (cached: a tarball per recipe);
#   2. the wheels: every file of requirements.lock downloaded from PyPI for the base's Python
#      and platform, checked against the lock's sha256 (cached: a directory per lock);
#   3. `podman build` of the Containerfile on that base, pip reading the wheel directory
#      mounted read-only, with no network (podman's layer cache makes a rebuild after a source
#      change take seconds).
#
# Usage: scripts/build-image.sh [--tag REF] [--refresh-base] [--smoke]
#   --tag REF        the image's name (default localhost/gitea-flux-bridge:<version>)
#   --refresh-base   make the Debian base again (picks up Debian's security updates)
#   --smoke          then run it as the chart runs it (its non-root user, read-only root
#                    filesystem, no capabilities) on examples/fleet and print the time to ready
#   --print-ref      print the default image name and exit
#   --print-podman   print podman's global arguments for this host (line 1) and the
#                    arguments `podman run` needs here (line 2), then exit (the tests use them)
#
# Needs (Debian): apt-get install podman mmdebstrap runc. Run as root (mmdebstrap's root mode
# and podman's root storage). Env: GFB_IMAGE_CACHE (default ~/.cache/gitea-flux-bridge/image).
# The last line printed is the image name; the lines before it say the size and the times.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "build-image: ERROR: $*" >&2; exit 1; }
note() { echo "build-image: $*" >&2; }

VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' receiver/__init__.py)
[[ -n $VERSION ]] || die "no __version__ in receiver/__init__.py"
TAG=localhost/gitea-flux-bridge:$VERSION
REFRESH=0 SMOKE=0 PRINT_PODMAN=0
while (($#)); do
	case $1 in
	--tag) TAG=${2:?--tag needs a value}; shift 2 ;;
	--refresh-base) REFRESH=1; shift ;;
	--smoke) SMOKE=1; shift ;;
	--print-ref) echo "$TAG"; exit 0 ;;
	--print-podman) PRINT_PODMAN=1; shift ;;
	*) die "unknown argument $1 (see the header of $0)" ;;
	esac
done

# --- podman's arguments for this host ------------------------------------------------------
# crun (podman's default on Debian) refuses hosts whose cgroups are mounted in hybrid mode (v1
# controllers plus a v2 hierarchy at /sys/fs/cgroup/unified); runc runs there.
PODMAN=(podman)
[[ -d /sys/fs/cgroup/unified ]] && PODMAN+=(--runtime runc)
# Root's podman raises the open-file and process limits to the maximum by default; a sandboxed
# VM may refuse that ("error setting rlimit ... operation not permitted"), so ask for the
# shell's own open-file limit and a modest process limit instead.
ULIMITS=(--ulimit "nofile=$(ulimit -Sn):$(ulimit -Hn)" --ulimit nproc=4096:4096)
if ((PRINT_PODMAN)); then
	echo "${PODMAN[*]:1}"
	echo "${ULIMITS[*]}"
	exit 0
fi

CACHE=${GFB_IMAGE_CACHE:-$HOME/.cache/gitea-flux-bridge/image}
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9   # two builds at once (CI and a test) serialize instead of racing on the cache

for tool in podman mmdebstrap; do
	command -v "$tool" >/dev/null || die "$tool is not installed (Debian: apt-get install podman mmdebstrap runc)"
done
((EUID == 0)) || die "run as root: mmdebstrap's root mode and podman's root storage"

if [[ ${PODMAN[*]} == *runc* ]] && ! command -v runc >/dev/null; then
	die "cgroups in hybrid mode: crun cannot run containers here, runc can (apt-get install runc)"
fi

# --- 1. the Debian base -------------------------------------------------------------------------
SUITE=bookworm
MIRRORS=(
	"deb http://deb.debian.org/debian $SUITE main"
	"deb http://deb.debian.org/debian $SUITE-updates main"
	"deb http://deb.debian.org/debian-security $SUITE-security main"
)
# essential: no apt in the image. python3-venv: the builder stage's `python3 -m venv`.
# passwd: groupadd/useradd for the image's user. libstdc++6: the C++ extensions of
# cel-expr-python and google-re2 link it (their wheels do not carry it). The merged-usr hook: no usrmerge (and no perl
# modules it would pull in).
MMDEBSTRAP_ARGS=(
	--variant=essential "--include=python3,python3-venv,ca-certificates,passwd,libstdc++6"
	--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
	--dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
	--dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/doc/*'
	--dpkgopt='path-include=/usr/share/doc/*/copyright'
)
base_key=$(printf '%s\n' "$SUITE" "${MIRRORS[@]}" "${MMDEBSTRAP_ARGS[@]}" | sha256sum | cut -c1-12)
BASE=localhost/gitea-flux-bridge-base:$SUITE-$base_key
base_tar=$CACHE/base-$SUITE-$base_key.tar
start=$(date +%s)
if ((REFRESH)); then
	rm -f "$base_tar"
	"${PODMAN[@]}" image rm --force "$BASE" >/dev/null 2>&1 || true
fi
if ! "${PODMAN[@]}" image exists "$BASE"; then
	if [[ ! -s $base_tar ]]; then
		note "making the Debian $SUITE base with mmdebstrap (about a minute)"
		rm -f "$CACHE"/base-*.tar   # other recipes' bases
		# (the output's name ends in .tar: mmdebstrap picks the format by the extension)
		mmdebstrap --quiet "${MMDEBSTRAP_ARGS[@]}" "$SUITE" "$CACHE/partial-base.tar" \
			"${MIRRORS[@]}" >"$CACHE/mmdebstrap.log" 2>&1 \
			|| die "mmdebstrap failed; its output is in $CACHE/mmdebstrap.log"
		mv "$CACHE/partial-base.tar" "$base_tar"
	fi
	"${PODMAN[@]}" import --quiet "$base_tar" "$BASE" >/dev/null
fi
base_done=$(date +%s)

# --- 2. the wheels ------------------------------------------------------------------------------
lock_key=$(sha256sum requirements.lock | cut -c1-12)
WHEELS=$CACHE/wheels-$lock_key
if [[ ! -d $WHEELS ]]; then
	note "downloading the locked wheels from PyPI"
	rm -rf "$CACHE"/wheels-*   # other locks' wheels
	# The base's platform: CPython 3.11 on glibc 2.36 (bookworm), whatever the host runs;
	# every manylinux tag that glibc 2.36 runs (pip does not widen --platform itself).
	platforms=(--platform any --platform manylinux2014_x86_64)
	for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
	python3 -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
		--only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --abi abi3 \
		--abi none "${platforms[@]}" \
		--dest "$WHEELS.partial" -r requirements.lock
	mv "$WHEELS.partial" "$WHEELS"
fi
wheels_done=$(date +%s)

# --- 3. the image -------------------------------------------------------------------------------
"${PODMAN[@]}" build --quiet --network none "${ULIMITS[@]}" \
	--build-arg "PYTHON_IMAGE=$BASE" --build-arg WHEELS=/wheels --volume "$WHEELS:/wheels:ro" \
	--file Containerfile --tag "$TAG" . >/dev/null
done_at=$(date +%s)
# Every source change leaves the last build's images behind (about 700 MB): drop the unnamed ones
# a day old. The builder's layers still in use are rebuilt from the cached wheels once a day.
"${PODMAN[@]}" image prune --force --filter until=24h >/dev/null 2>&1 || true

size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$TAG")
note "image $TAG: $((size / 1000000)) MB (base $((base_done - start))s, wheels $((wheels_done - base_done))s, build $((done_at - wheels_done))s, total $((done_at - start))s)"

if ((SMOKE)); then
	# The chart's pod: securityContext runAsUser/runAsGroup 10001 (the image's USER),
	# readOnlyRootFilesystem, no capabilities, no privilege escalation, an emptyDir at /tmp.
	port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
	name=gfb-smoke-$$
	t0=$(date +%s%N)
	"${PODMAN[@]}" run --detach --name "$name" "${ULIMITS[@]}" --read-only --read-only-tmpfs=false \
		--tmpfs /tmp:size=64m --cap-drop ALL --security-opt no-new-privileges \
		--publish "127.0.0.1:$port:8080" --volume "$PWD/examples/fleet:/srv/fleet:ro" \
		"$TAG" serve --manifests /srv/fleet >/dev/null
	trap '"${PODMAN[@]}" rm --force "$name" >/dev/null 2>&1 || true' EXIT
	ready=$(python3 - "$port" <<'PY'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/readyz"
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            print(reply.read().decode())
            break
    except OSError:
        time.sleep(0.05)
PY
)
	t1=$(date +%s%N)
	[[ -n $ready ]] || { "${PODMAN[@]}" logs "$name" >&2; die "the image did not become ready within 60s"; }
	user=$("${PODMAN[@]}" top "$name" user,huser,args | sed -n 2p)
	note "smoke: ready in $(( (t1 - t0) / 1000000 )) ms from podman run: $ready (process: $user)"
fi
echo "$TAG"
