#!/usr/bin/env bash
# Build the real test peers (etcd, kube-apiserver, helm, Flux controllers, Gitea)
# and the lint tools (promtool, actionlint) from their Go modules into a cache
# dir outside the repo.
#
# Usage:
#   scripts/testbin.sh [core|tools|flux|gitea|operator|flagger|all|<component>...]   (default: core)
#   scripts/testbin.sh --fetch <groups...>  only download what their builds need (run beside
#                                           a build of the same groups, ahead of it)
#   scripts/testbin.sh --print-dir          print the binary cache dir
#   scripts/testbin.sh --moddir <component> print the component's module source dir
#                                           (Gitea STATIC_ROOT_PATH, Flux CRDs)
#
# Groups: core = etcd kube-apiserver helm
#         tools = promtool actionlint (promtool: from PATH or Debian's `prometheus`
#                 package when apt has it, else built; actionlint: a minute or two)
#         flux = source-controller kustomize-controller notification-controller
#                helm-controller
#         operator = flux-operator (ResourceSet / ResourceSetInputProvider)
#         flagger = flagger (progressive delivery; the canary e2e test's peer)
#
# Env: GFBTEST_BIN (cache dir), GFBTEST_GO_P (go build -p, default 2).
# Each pin is the release the tests were written against; bump them together.
set -euo pipefail

# --- pins -------------------------------------------------------------------
ETCD_VERSION=v3.6.16                      # go.etcd.io/etcd/server/v3
K8S_VERSION=v1.36.3                       # k8s.io/kubernetes (kube-apiserver)
HELM_VERSION=v3.21.4                      # helm.sh/helm/v3
SOURCE_CONTROLLER_VERSION=v1.9.4          # github.com/fluxcd/source-controller
KUSTOMIZE_CONTROLLER_VERSION=v1.9.4       # github.com/fluxcd/kustomize-controller
NOTIFICATION_CONTROLLER_VERSION=v1.9.3    # github.com/fluxcd/notification-controller
HELM_CONTROLLER_VERSION=v1.6.4            # github.com/fluxcd/helm-controller (same Flux line)
GITEA_VERSION=v1.26.3                     # code.gitea.io/gitea
PROMETHEUS_VERSION=v0.316.0               # github.com/prometheus/prometheus (promtool 3.16.0)
ACTIONLINT_VERSION=v1.7.12                # github.com/rhysd/actionlint
# AGPL-3.0: the tests only run it locally (unchanged but for a placeholder page for its unbuilt
# web UI, see local_module_copy) and distribute neither binary nor source.
FLUX_OPERATOR_VERSION=v0.59.0             # github.com/controlplaneio-fluxcd/flux-operator
FLUX_OPERATOR_TOOLCHAIN=go1.27.0          # its go.mod needs go >= 1.27 (fetched via the Go proxy)
FLAGGER_VERSION=v1.36.1                   # github.com/fluxcd/flagger

CACHE=${GFBTEST_BIN:-$HOME/.cache/gitea-flux-bridge/testbin}
JOBS=${GFBTEST_GO_P:-2}   # 2 cores; k8s compile units are memory hungry

# k8s staging modules are tagged v0.<minor>.<patch> for k/k v1.<minor>.<patch>.
K8S_STAGING_VERSION="v0.${K8S_VERSION#v1.}"
K8S_MINOR=${K8S_VERSION#v1.}; K8S_MINOR=${K8S_MINOR%%.*}

CORE=(etcd kube-apiserver helm)
FLUX=(source-controller kustomize-controller notification-controller helm-controller)
TOOLS=(promtool actionlint)
FLAGGER=(flagger)
OPERATOR=(flux-operator)
ALL=("${CORE[@]}" "${TOOLS[@]}" "${FLUX[@]}" gitea "${OPERATOR[@]}" "${FLAGGER[@]}")

die() { echo "testbin: ERROR: $*" >&2; exit 1; }

# Run go outside any module (and outside the repo), for downloads/queries.
go_outside() { (cd / && GOWORK=off GOFLAGS=-mod=mod go "$@"); }

# Extract a string field from `go mod download -json` output.
json_field() { sed -n 's/^[[:space:]]*"'"$1"'": "\(.*\)",\{0,1\}$/\1/p'; }

# --- component table ----------------------------------------------------------
# Sets: MOD VER PKG CGO TAGS LDFLAGS. Extra wrapper replace lines come from
# wrapper_replaces (repeats the component's *non-local* replaces; local ones
# like `=> ./api` point into directories the module zip does not contain, and
# their targets are published modules at the same version anyway).
component_info() {
	TAGS=""; CGO=0; LDFLAGS="-s -w"; TOOLCHAIN=${GOTOOLCHAIN:-}
	case $1 in
	etcd)
		MOD=go.etcd.io/etcd/server/v3; VER=$ETCD_VERSION; PKG=$MOD ;;
	kube-apiserver)
		MOD=k8s.io/kubernetes; VER=$K8S_VERSION; PKG=$MOD/cmd/kube-apiserver
		# Without these /version says v0.0.0-master+$Format:%H$ and Helm's
		# kubeVersion checks / .Capabilities.KubeVersion break.
		local v
		for v in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
			LDFLAGS+=" -X $v.gitVersion=$K8S_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$K8S_MINOR -X $v.gitTreeState=clean"
		done ;;
	helm)
		MOD=helm.sh/helm/v3; VER=$HELM_VERSION; PKG=$MOD/cmd/helm
		# Without these `helm version` says v3.21 and helm template/lint assume k8s 1.20.
		LDFLAGS+=" -X $MOD/internal/version.version=$HELM_VERSION"
		local p
		for p in pkg/chartutil pkg/lint/rules; do
			LDFLAGS+=" -X $MOD/$p.k8sVersionMajor=1 -X $MOD/$p.k8sVersionMinor=$K8S_MINOR"
		done ;;
	source-controller)
		MOD=github.com/fluxcd/source-controller; VER=$SOURCE_CONTROLLER_VERSION; PKG=$MOD ;;
	kustomize-controller)
		MOD=github.com/fluxcd/kustomize-controller; VER=$KUSTOMIZE_CONTROLLER_VERSION; PKG=$MOD ;;
	notification-controller)
		MOD=github.com/fluxcd/notification-controller; VER=$NOTIFICATION_CONTROLLER_VERSION; PKG=$MOD ;;
	helm-controller)
		MOD=github.com/fluxcd/helm-controller; VER=$HELM_CONTROLLER_VERSION; PKG=$MOD ;;
	gitea)
		MOD=code.gitea.io/gitea; VER=$GITEA_VERSION; PKG=$MOD
		# sqlite3 DB_TYPE needs the cgo mattn driver (build tag `sqlite`).
		CGO=1; TAGS="sqlite sqlite_unlock_notify"
		# A real version: Flux's gitea provider (Gitea SDK) rejects "development".
		LDFLAGS+=" -X main.Version=${GITEA_VERSION#v} -X 'main.Tags=$TAGS'" ;;
	promtool)
		# Prometheus tags its Go module v0.<3 major minor>.<patch> for release v3.<minor>.<patch>.
		MOD=github.com/prometheus/prometheus; VER=$PROMETHEUS_VERSION; PKG=$MOD/cmd/promtool
		local minor=${PROMETHEUS_VERSION#v0.3}; minor=${minor%%.*}; minor=$((10#$minor))
		LDFLAGS+=" -X github.com/prometheus/common/version.Version=3.$minor.${PROMETHEUS_VERSION##*.}" ;;
	actionlint)
		MOD=github.com/rhysd/actionlint; VER=$ACTIONLINT_VERSION; PKG=$MOD/cmd/actionlint
		LDFLAGS+=" -X $MOD.version=${ACTIONLINT_VERSION#v}" ;;
	flux-operator)
		MOD=github.com/controlplaneio-fluxcd/flux-operator; VER=$FLUX_OPERATOR_VERSION
		PKG=$MOD/cmd/operator; TOOLCHAIN=$FLUX_OPERATOR_TOOLCHAIN
		LDFLAGS+=" -X main.VERSION=${FLUX_OPERATOR_VERSION#v}" ;;
	flagger)
		MOD=github.com/fluxcd/flagger; VER=$FLAGGER_VERSION; PKG=$MOD/cmd/flagger
		LDFLAGS+=" -X $MOD/pkg/version.REVISION=$FLAGGER_VERSION" ;;
	*) die "unknown component '$1' (known: ${ALL[*]}, core, tools, flux, operator, flagger, all)" ;;
	esac
}

wrapper_replaces() {
	case $1 in
	kube-apiserver) k8s_staging_replaces ;;
	source-controller) cat <<-'EOF'
		replace github.com/opencontainers/go-digest => github.com/opencontainers/go-digest v1.0.1-0.20220411205349-bde1400a84be
		// Not upstream: the module proxy reachable here refuses artifact v0.18.2
		// (403 "not available"); v0.18.0 is the nearest served release.
		replace github.com/fluxcd/pkg/artifact => github.com/fluxcd/pkg/artifact v0.18.0
		EOF
		;;
	kustomize-controller) cat <<-'EOF'
		replace github.com/opencontainers/go-digest => github.com/opencontainers/go-digest v1.0.1-0.20220411205349-bde1400a84be
		replace sigs.k8s.io/kustomize/api => sigs.k8s.io/kustomize/api v0.21.1
		replace sigs.k8s.io/kustomize/kyaml => sigs.k8s.io/kustomize/kyaml v0.21.1
		replace gopkg.in/yaml.v3 => gopkg.in/yaml.v3 v3.0.1
		EOF
		;;
	notification-controller) cat <<-'EOF'
		replace gopkg.in/yaml.v3 => gopkg.in/yaml.v3 v3.0.1
		EOF
		;;
	helm-controller) cat <<-'EOF'
		replace github.com/opencontainers/go-digest => github.com/opencontainers/go-digest v1.0.1-0.20231025023718-d50d2fec9c98
		replace sigs.k8s.io/kustomize/api => sigs.k8s.io/kustomize/api v0.21.1
		replace sigs.k8s.io/kustomize/kyaml => sigs.k8s.io/kustomize/kyaml v0.21.1
		EOF
		;;
	gitea) cat <<-'EOF'
		godebug x509negativeserial=1
		replace github.com/jaytaylor/html2text => github.com/Necoro/html2text v0.0.0-20250804200300-7bf1ce1c7347
		replace github.com/nektos/act => gitea.com/gitea/act v0.261.10
		replace github.com/urfave/cli/v3 => github.com/urfave/cli/v3 v3.4.1
		replace go.yaml.in/yaml/v4 => go.yaml.in/yaml/v4 v4.0.0-rc.3
		replace github.com/Azure/azure-sdk-for-go/sdk/azcore => github.com/Azure/azure-sdk-for-go/sdk/azcore v1.19.0
		replace github.com/Azure/azure-sdk-for-go/sdk/storage/azblob => github.com/Azure/azure-sdk-for-go/sdk/storage/azblob v1.6.2
		replace github.com/microsoft/go-mssqldb => github.com/microsoft/go-mssqldb v1.9.7
		EOF
		;;
	flux-operator) cat <<-'EOF'
		// Not upstream: the module proxy reachable here refuses the pseudo-version pinned
		// (403 "not available"); this one, from February 2026, is the nearest it serves.
		replace github.com/google/go-containerregistry/pkg/authn/kubernetes => github.com/google/go-containerregistry/pkg/authn/kubernetes v0.0.0-20260224031529-85f2bf5f7303
		EOF
		;;
	esac   # etcd: only local replaces; helm, promtool, actionlint: none
}

# A component whose module zip cannot build as published gets a writable copy next to its
# wrapper (printed: the replace line pointing at it). flux-operator embeds its web UI from
# web/dist, which is built by npm and not in the zip; the tests run it with the web server
# off, so one placeholder page satisfies the embed.
local_module_copy() {
	local name=$1 src=$2 dir
	case $name in
	flux-operator)
		dir=$(GOTOOLCHAIN=$TOOLCHAIN go_outside mod download -json "$MOD@$VER" | json_field Dir) ||
			die "$name: cannot download $MOD@$VER"
		[[ -d $dir ]] || die "$name: no module dir for $MOD@$VER"
		cp -r "$dir" "$src/mod" && chmod -R u+w "$src/mod" && mkdir -p "$src/mod/web/dist" &&
			echo '<!doctype html><title>web UI not built</title>' >"$src/mod/web/dist/index.html" ||
			die "$name: copying its module failed"
		echo "replace $MOD => ./mod" ;;
	esac
}

# k/k requires every staging module as `k8s.io/<name> v0.0.0` and maps it to
# ./staging/src/...; v0.0.0 is not served, so pin each to the published
# v0.<minor>.<patch>. The list is read from k/k's own go.mod (not hard-coded).
k8s_staging_replaces() {
	local gomod names
	gomod=$(go_outside mod download -json "k8s.io/kubernetes@$K8S_VERSION" | json_field GoMod) ||
		die "kube-apiserver: cannot download k8s.io/kubernetes@$K8S_VERSION"
	[[ -f $gomod ]] || die "kube-apiserver: no go.mod for k8s.io/kubernetes@$K8S_VERSION"
	names=$(
		sed -E 's/^[[:space:]]*(require|replace)[[:space:]]+//' "$gomod" | awk '
			$1 ~ /^k8s\.io\// && $2 == "v0.0.0"                { print $1 }
			$1 ~ /^k8s\.io\// && $2 == "=>" && $3 ~ /^\.\/staging\/src\// { print $1 }' | sort -u
	)
	[[ -n $names ]] || die "kube-apiserver: found no staging modules in $gomod"
	local n
	echo "replace ("
	for n in $names; do printf '\t%s => %s %s\n' "$n" "$n" "$K8S_STAGING_VERSION"; done
	echo ")"
}

# --- promtool from Debian ----------------------------------------------------------
# Building promtool pulls most of Prometheus (about 7.5 minutes cold on two cores); the tests
# only run `promtool check rules` and `promtool test rules`, which Debian's (and Ubuntu's)
# `prometheus` package ships. So a promtool on PATH is used as it is, and otherwise the
# package's promtool is unpacked into the cache with `apt-get download` + `dpkg-deb -x`
# (seconds): unpacking runs none of the package's maintainer scripts, so no prometheus
# server is started (its postinst starts one through invoke-rc.d or systemd unless
# policy-rc.d forbids it), no system user is added and none of its web UI's dependencies
# are installed. Only when neither is there is promtool built from its Go module.
debian_promtool() {
	local onpath tmp deb ver
	if onpath=$(command -v promtool) && "$onpath" --version >/dev/null 2>&1; then
		ln -sfn "$onpath" "$CACHE/promtool"
		echo "promtool from PATH ($onpath)"
		return 0
	fi
	if deb=$(compgen -G "$CACHE/promtool-deb-*" | tail -n 1) && [[ -x $deb ]]; then
		ln -sfn "${deb##*/}" "$CACHE/promtool"
		echo "cached promtool ${deb##*/promtool-deb-} (Debian)"
		return 0
	fi
	command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || return 1
	tmp=$(mktemp -d) || return 1
	# apt-get download writes into the working directory; as root it warns that the _apt
	# user cannot write there, which is harmless.
	if (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1) &&
		deb=$(compgen -G "$tmp/prometheus_*.deb") && dpkg-deb -x "$deb" "$tmp/x" &&
		[[ -x $tmp/x/usr/bin/promtool ]] && "$tmp/x/usr/bin/promtool" --version >/dev/null 2>&1; then
		ver=$(dpkg-deb -f "$deb" Version); ver=${ver//[^A-Za-z0-9.+~-]/_}
		mv -f "$tmp/x/usr/bin/promtool" "$CACHE/promtool-deb-$ver"
		ln -sfn "promtool-deb-$ver" "$CACHE/promtool"
		rm -rf "$tmp"
		echo "promtool from the Debian package prometheus $ver"
		return 0
	fi
	rm -rf "$tmp"
	return 1
}

# --- fetch and build ----------------------------------------------------------------
# A cold build is a `go get` (resolving and downloading the module graph: about an eighth of
# the time, waiting on the network) and a `go build` (the CPU). `--fetch` runs the first half
# ahead of the builder in another process, so that each component's downloads overlap the
# compiling of the one before it. A component's wrapper is prepared under a lock of its own
# (by the fetcher or the builder, whichever comes first) and marked with the version and this
# script's checksum, so a wrapper prepared by an older script is prepared again.
SCRIPT_SUM=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)

# Runs "$@" holding the component's lock (a subshell: a die() inside ends only it).
with_component_lock() {
	local name=$1; shift
	mkdir -p "$CACHE/src"
	( flock 8; "$@" ) 8>"$CACHE/src/$name.lock"
}

# The environment of a component's `go get` and `go build` (called in a subshell).
go_env() {
	export GOWORK=off GOFLAGS="${GOFLAGS:-}" CGO_ENABLED=$CGO GOTOOLCHAIN=$TOOLCHAIN
	# Gitea's Makefile raises SQLite's variable limit for big IN() queries.
	if [[ $1 == gitea ]]; then
		export CGO_CFLAGS="${CGO_CFLAGS:--O2 -g} -DSQLITE_MAX_VARIABLE_NUMBER=32766"
	fi
}

build_flags() {
	BUILDFLAGS=(-trimpath "-p=$JOBS")
	[[ -z $TAGS ]] || BUILDFLAGS+=("-tags=${TAGS// /,}")
}

# The component's wrapper module in $CACHE/src/<name> with its module graph downloaded
# (component_info already called; run under its lock).
prepare_wrapper() {
	local name=$1 src="$CACHE/src/$1" mark="$VER $SCRIPT_SUM"
	[[ -f $src/.fetched && $(<"$src/.fetched") == "$mark" ]] && return 0
	# Wrapper module: `go install pkg@ver` refuses modules whose go.mod has
	# replace directives, so require the component from our own tiny module
	# (one per component, so MVS does not mix their dependency pins).
	# The replace lines must be in place BEFORE `go get`.
	rm -rf "$src"; mkdir -p "$src"
	local replaces
	replaces=$(wrapper_replaces "$name") || die "$name: generating wrapper replaces failed"
	replaces+=$'\n'$(local_module_copy "$name" "$src") || die "$name: preparing its module copy failed"
	cat >"$src/go.mod" <<-EOF
		// Generated by gitea-flux-bridge scripts/testbin.sh; do not edit.
		module gfb-testbin/$name

		go 1.26.0

		$replaces
	EOF
	build_flags
	(
		cd "$src"
		go_env "$name"
		# `tool` directive (Go >= 1.24) records the main package in the wrapper.
		# (its per-module chatter goes to a log, shown only on failure)
		go get -tool "${BUILDFLAGS[@]}" "$PKG@$VER" >"$src/go-get.log" 2>&1 || {
			tail -n 40 "$src/go-get.log" >&2
			die "$name: 'go get -tool $PKG@$VER' failed (log: $src/go-get.log)"
		}
	) || exit 1
	echo "$mark" >"$src/.fetched"
}

fetch_one() {
	local name=$1
	component_info "$name"
	# Built already, or (promtool) taken from PATH or Debian's package: nothing to fetch.
	[[ -x $CACHE/$name-$VER ]] && return 0
	[[ $name == promtool && -x $CACHE/promtool ]] && return 0
	local start=$SECONDS
	with_component_lock "$name" prepare_wrapper "$name" || return 1
	echo "fetched $name $VER in $((SECONDS - start)) s"
}

build_one() {
	local name=$1
	component_info "$name"
	local bin="$CACHE/$name-$VER" src="$CACHE/src/$name"
	if [[ -x $bin ]]; then
		ln -sfn "$name-$VER" "$CACHE/$name"
		echo "cached $name $VER"
		return 0
	fi
	if [[ $name == promtool ]] && debian_promtool; then return 0; fi
	echo "building $name $VER ($MOD) ..."
	local start=$SECONDS
	with_component_lock "$name" prepare_wrapper "$name" || exit 1
	build_flags
	(
		cd "$src"
		go_env "$name"
		go build "${BUILDFLAGS[@]}" -ldflags "$LDFLAGS" -o "$bin.tmp" "$PKG" ||
			die "$name: 'go build $PKG' failed (see output above; wrapper in $src)"
	) || exit 1
	mv -f "$bin.tmp" "$bin"
	ln -sfn "$name-$VER" "$CACHE/$name"
	echo "built $name $VER in $((SECONDS - start)) s ($(du -h "$bin" | cut -f1))"
}

print_moddir() {
	component_info "$1"
	local out dir
	out=$(GOTOOLCHAIN=$TOOLCHAIN go_outside mod download -json "$MOD@$VER") || die "$1: 'go mod download $MOD@$VER' failed: $out"
	dir=$(json_field Dir <<<"$out")
	[[ -d $dir ]] || die "$1: no module dir for $MOD@$VER"
	echo "$dir"
}

main() {
	case ${1:-} in
	--print-dir) echo "$CACHE"; return ;;
	--moddir) [[ $# -eq 2 ]] || die "usage: $0 --moddir <component>"; print_moddir "$2"; return ;;
	-h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; return ;;
	esac
	command -v go >/dev/null || die "go not found in PATH"
	local fetch=false
	if [[ ${1:-} == --fetch ]]; then fetch=true; shift; fi
	(($# > 0)) || set -- core
	local -a todo=()
	local a
	for a in "$@"; do
		case $a in
		core) todo+=("${CORE[@]}") ;;
		tools) todo+=("${TOOLS[@]}") ;;
		flux) todo+=("${FLUX[@]}") ;;
		operator) todo+=("${OPERATOR[@]}") ;;
		flagger) todo+=("${FLAGGER[@]}") ;;
		all) todo+=("${ALL[@]}") ;;
		*) component_info "$a"; todo+=("$a") ;;   # validates the name
		esac
	done
	mkdir -p "$CACHE"
	if $fetch; then
		# No build lock: the fetcher runs beside the builder (the per-component locks order
		# the two). A failed fetch is left to the build, which fetches again and says why.
		for a in "${todo[@]}"; do
			( fetch_one "$a" ) || echo "testbin: fetching $a failed; its build fetches it again" >&2
		done
		return 0
	fi
	# One build at a time per cache: two at once would share wrapper dirs and half-written
	# binaries (and two cores are busy enough with one). A second caller waits, then finds
	# what the first built.
	exec 9>"$CACHE/.lock"
	if ! flock -n 9; then
		echo "testbin: another build holds $CACHE/.lock; waiting for it" >&2
		flock 9
	fi
	for a in "${todo[@]}"; do build_one "$a"; done
}

main "$@"
