#!/usr/bin/env bash
# notify-flux: tell gitea-flux-bridge about a push, signed with the timestamped scheme, and
# optionally wait until Flux has deployed it. Needs only bash, openssl and curl.
#
# Configuration (the composite action sets these from its inputs; set them yourself to run it
# anywhere else):
#   FLUX_BRIDGE_URL         base URL of the bridge, e.g. https://flux-bridge.example.com
#   FLUX_BRIDGE_HOOK        the Receiver's hook path (/hook/<digest>), the bare digest, or a full
#                           URL (then FLUX_BRIDGE_URL may be empty)
#   FLUX_BRIDGE_TOKEN       the Receiver's token (or FLUX_BRIDGE_TOKEN_FILE: a file holding it)
#   FLUX_BRIDGE_PATHS       optional changed paths: one per line (paths may contain spaces), or
#                           separated by spaces on a single line. Omit them and every consumer
#                           of the matched sources counts as touched.
#   FLUX_BRIDGE_WAIT        seconds to wait for the deployment; 0 (default) does not wait
#   FLUX_BRIDGE_REPOSITORY  repository URL  (default: $GITHUB_SERVER_URL/$GITHUB_REPOSITORY)
#   FLUX_BRIDGE_REF         pushed ref      (default: $GITHUB_REF)
#   FLUX_BRIDGE_SHA         pushed commit   (default: $GITHUB_SHA)
#   FLUX_BRIDGE_CA_FILE     CA bundle for the bridge's TLS certificate (curl --cacert)
#   FLUX_BRIDGE_RETRIES     attempts when the bridge is unreachable, busy (429/503) or
#                           failing (5xx); each attempt is signed afresh (default 3)
#   FLUX_BRIDGE_DRY_RUN     1: print the body and the X-Signature header, send nothing
#   FLUX_BRIDGE_ACCEPT_SUPERSEDED
#                           true: a deployment superseded by a later commit (Flux went past
#                           this one before reporting it) ends the wait with 0, not 4
#   FLUX_BRIDGE_WAIT_CANARIES
#                           true: the wait also follows the Flagger canaries of the deployed
#                           Kustomizations and HelmReleases; it ends when they are promoted
#                           (0) or one is rolled back (1), not when the manifests are applied
#
# Exit status: 0 accepted (and, when waiting, every target Ready at the commit);
#              1 the deployment failed or timed out, or the wait ran out first;
#              2 bad configuration; 3 the bridge refused the request or could not be reached;
#              4 superseded: Flux went to a later commit and never reported this one (not a
#                success: nothing says this commit ran; see FLUX_BRIDGE_ACCEPT_SUPERSEDED).
#
# The token is never printed and never passed on a command line: the HMAC is computed here
# (RFC 2104 over openssl's SHA-256), so `ps` on a shared runner cannot see the key.
set +x
set -uo pipefail
shopt -u patsub_replacement 2>/dev/null || true
shopt -s lastpipe
export LC_ALL=C

me=notify-flux
say() { printf '%s: %s\n' "$me" "$*" >&2; }
die() {
	local code=$1
	shift
	say "$*"
	exit "$code"
}

# --- configuration ----------------------------------------------------------------------------

base_url=${FLUX_BRIDGE_URL:-}
hook=${FLUX_BRIDGE_HOOK:-}
wait_seconds=${FLUX_BRIDGE_WAIT:-0}
retries=${FLUX_BRIDGE_RETRIES:-3}
repository=${FLUX_BRIDGE_REPOSITORY:-}
ref=${FLUX_BRIDGE_REF:-${GITHUB_REF:-}}
sha=${FLUX_BRIDGE_SHA:-${GITHUB_SHA:-}}
raw_paths=${FLUX_BRIDGE_PATHS:-}
accept_superseded=${FLUX_BRIDGE_ACCEPT_SUPERSEDED:-false}
wait_canaries=${FLUX_BRIDGE_WAIT_CANARIES:-false}

if [[ -z $repository ]]; then
	server=${GITHUB_SERVER_URL:-}
	repo=${GITHUB_REPOSITORY:-}
	[[ -n $server && -n $repo ]] && repository="${server%/}/$repo"
fi

token=${FLUX_BRIDGE_TOKEN:-}
if [[ -z $token && -n ${FLUX_BRIDGE_TOKEN_FILE:-} ]]; then
	[[ -r $FLUX_BRIDGE_TOKEN_FILE ]] || die 2 "cannot read FLUX_BRIDGE_TOKEN_FILE"
	IFS= read -r -d '' token <"$FLUX_BRIDGE_TOKEN_FILE" || true
	token=${token%$'\n'} # one trailing newline, as `echo` leaves it
fi
[[ -n $token ]] || die 2 "no token: set the token input (FLUX_BRIDGE_TOKEN or _TOKEN_FILE)"
# Child processes (openssl, curl) have no need of it.
unset FLUX_BRIDGE_TOKEN

[[ -n $hook ]] ||
	die 2 "no hook path: set hook-path (FLUX_BRIDGE_HOOK): see 'gitea-flux-bridge hook-url'"
if [[ $hook =~ ^https?:// ]]; then
	hook_url=$hook
	[[ -n $base_url ]] || base_url=${hook%%/hook/*}
else
	[[ $base_url =~ ^https?:// ]] ||
		die 2 "url (FLUX_BRIDGE_URL) must be the bridge's http(s) base URL"
	[[ $hook =~ ^[0-9a-fA-F]{64}$ ]] && hook="/hook/$hook"
	[[ $hook == /* ]] || hook="/$hook"
	hook_url="${base_url%/}$hook"
fi
base_url=${base_url%/}

[[ $wait_seconds =~ ^[0-9]{1,6}$ ]] ||
	die 2 "wait-seconds (FLUX_BRIDGE_WAIT) must be a whole number of seconds"
wait_seconds=$((10#$wait_seconds))
[[ $retries =~ ^[1-9][0-9]*$ ]] || die 2 "FLUX_BRIDGE_RETRIES must be a positive number"
case $accept_superseded in
true | 1) accept_superseded=true ;;
false | 0 | "") accept_superseded=false ;;
*) die 2 "accept-superseded (FLUX_BRIDGE_ACCEPT_SUPERSEDED) must be true or false" ;;
esac
case $wait_canaries in
true | 1) wait_canaries=true ;;
false | 0 | "") wait_canaries=false ;;
*) die 2 "wait-for-canaries (FLUX_BRIDGE_WAIT_CANARIES) must be true or false" ;;
esac
[[ -n $repository ]] ||
	die 2 "no repository: set GITHUB_SERVER_URL and GITHUB_REPOSITORY, or FLUX_BRIDGE_REPOSITORY"
[[ -n $ref ]] || die 2 "no ref: set GITHUB_REF or FLUX_BRIDGE_REF"
[[ $sha =~ ^([0-9a-fA-F]{40}|[0-9a-fA-F]{64})$ ]] ||
	die 2 "GITHUB_SHA / FLUX_BRIDGE_SHA must be a full commit id"

curl_opts=(--silent --show-error --connect-timeout 10)
if [[ -n ${FLUX_BRIDGE_CA_FILE:-} ]]; then
	curl_opts+=(--cacert "$FLUX_BRIDGE_CA_FILE")
fi

command -v openssl >/dev/null || die 2 "openssl is required"
command -v curl >/dev/null || die 2 "curl is required"

tmp=$(umask 077 && mktemp -d "${TMPDIR:-/tmp}/notify-flux.XXXXXX") ||
	die 2 "cannot create a temporary directory"
trap 'rm -rf "$tmp"' EXIT

# --- JSON -------------------------------------------------------------------------------------

# A JSON string literal for $1: backslash, quote and control characters escaped; other bytes
# (UTF-8) pass through unchanged.
json_string() {
	local s=$1 i c hex rep
	# shellcheck disable=SC1003 # these are the two-character JSON escapes, quoted literally
	local bs='\\' q='\"' nl='\n' cr='\r' tab='\t' bsp='\b' ff='\f'
	s=${s//\\/"$bs"}
	s=${s//\"/"$q"}
	s=${s//$'\n'/"$nl"}
	s=${s//$'\r'/"$cr"}
	s=${s//$'\t'/"$tab"}
	s=${s//$'\b'/"$bsp"}
	s=${s//$'\f'/"$ff"}
	if [[ $s == *[$'\x01'-$'\x1f']* ]]; then
		for ((i = 1; i < 32; i++)); do
			printf -v hex '%02x' "$i"
			# shellcheck disable=SC2059 # \xHH with HH from %02x: the control character itself
			printf -v c "\\x$hex"
			rep="\\u00$hex"
			s=${s//"$c"/"$rep"}
		done
	fi
	printf '"%s"' "$s"
}

paths=()
if [[ $raw_paths == *$'\n'* ]]; then
	while IFS= read -r line; do
		line=${line%$'\r'}
		[[ $line =~ ^[[:space:]]*$ ]] || paths+=("$line")
	done <<<"$raw_paths"
elif [[ -n $raw_paths ]]; then
	read -r -a paths <<<"$raw_paths"
fi

body="{\"repository\":$(json_string "$repository")"
body+=",\"ref\":$(json_string "$ref"),\"sha\":$(json_string "$sha")"
if ((${#paths[@]} > 0)); then
	body+=',"paths":['
	sep=''
	for p in "${paths[@]}"; do
		body+="$sep$(json_string "$p")"
		sep=','
	done
	body+=']'
fi
body+='}'
printf '%s' "$body" >"$tmp/body"

# Field of a flat JSON reply: the first "name": "value" (or true/false/number) in $2.
json_field() {
	local re="\"$1\"[[:space:]]*:[[:space:]]*(\"([^\"\\\\]|\\\\.)*\"|true|false|null|[0-9.]+)"
	[[ $2 =~ $re ]] || return 1
	local v=${BASH_REMATCH[1]}
	v=${v#\"}
	v=${v%\"}
	printf '%s' "$v"
}

# --- signing ----------------------------------------------------------------------------------

# hex(HMAC-SHA256(key=$1, message=$2)), RFC 2104 with openssl doing SHA-256. The key stays in
# this shell (printf is a builtin): it never appears in any process's arguments.
hmac_sha256_hex() {
	local key=$1 msg=$2 keyhex="" i b v ipad="" opad="" out
	if ((${#key} > 64)); then
		out=$(printf '%s' "$key" | openssl dgst -sha256 -hex) || return 1
		keyhex=${out##* }
	else
		for ((i = 0; i < ${#key}; i++)); do
			printf -v v '%d' "'${key:i:1}"
			printf -v b '%02x' $((v & 255))
			keyhex+=$b
		done
	fi
	for ((i = 0; i < 64; i++)); do
		b=0
		((2 * i < ${#keyhex})) && b=$((16#${keyhex:2*i:2}))
		printf -v v '\\x%02x' $((b ^ 0x36))
		ipad+=$v
		printf -v v '\\x%02x' $((b ^ 0x5c))
		opad+=$v
	done
	# shellcheck disable=SC2059 # the formats are built from \xHH escapes only
	out=$({
		printf "$opad"
		{
			printf "$ipad"
			printf '%s' "$msg"
		} | openssl dgst -sha256 -binary
	} | openssl dgst -sha256 -hex) || return 1
	out=${out##* }
	[[ $out =~ ^[0-9a-f]{64}$ ]] || return 1
	printf '%s' "$out"
}

# Write the push's X-Signature header for "$1" (the exact body) into $tmp/headers:
# HMAC-SHA256 under the token of "<unix>." + body.
sign_into_headers() {
	local now sig
	printf -v now '%(%s)T' -1
	sig=$(hmac_sha256_hex "$token" "$now.$1") || die 2 "openssl could not compute the signature"
	printf 'X-Signature: t=%s,v1=%s\n' "$now" "$sig" >"$tmp/headers"
}

# Write the X-Signature header of GET /deliveries/"$1" into $tmp/headers. A read is signed
# under a key derived from the token (hex HMAC of a fixed label, used as text) over
# "<unix>.GET /deliveries/<id>": it can never pass for a push, nor a push for it.
read_key=""
sign_read_into_headers() {
	local now sig
	if [[ -z $read_key ]]; then
		read_key=$(hmac_sha256_hex "$token" "gitea-flux-bridge delivery-read v1") ||
			die 2 "openssl could not compute the signature"
	fi
	printf -v now '%(%s)T' -1
	sig=$(hmac_sha256_hex "$read_key" "$now.GET /deliveries/$1") ||
		die 2 "openssl could not compute the signature"
	printf 'X-Signature: t=%s,v1=%s\n' "$now" "$sig" >"$tmp/headers"
}

# --- reporting --------------------------------------------------------------------------------

# One line per target of a reply or progress line: "Kind namespace/name: state (reason)".
summarise_targets() {
	local doc=${1#*\"targets\"} obj kind ns name state reason message
	doc=${doc%%\"tracked\"*}
	grep -oE '\{"apiVersion": ?"[^{}]*(\{[^{}]*\}[^{}]*)?\}' <<<"$doc" | while IFS= read -r obj; do
		kind=$(json_field kind "$obj") || continue
		ns=$(json_field namespace "$obj") || ns=""
		name=$(json_field name "$obj") || name=""
		state=$(json_field state "$obj") || state="?"
		reason=$(json_field reason "$obj") || reason=""
		message=$(json_field message "$obj") || message=""
		printf '  %s %s/%s: %s%s%s\n' "$kind" "$ns" "$name" "$state" \
			"${reason:+ ($reason)}" "${message:+: $message}"
	done
}

set_output() {
	local file=${GITHUB_OUTPUT:-${GITEA_OUTPUT:-}}
	if [[ -n $file ]]; then
		printf '%s=%s\n' "$1" "$2" >>"$file" 2>/dev/null || true
	fi
}

urlencode() {
	local s=$1 out="" c i v
	for ((i = 0; i < ${#s}; i++)); do
		c=${s:i:1}
		if [[ $c == [A-Za-z0-9._~-] ]]; then
			out+=$c
		else
			printf -v v '%%%02X' "'$c"
			out+=$v
		fi
	done
	printf '%s' "$out"
}

# --- send -------------------------------------------------------------------------------------

if [[ ${FLUX_BRIDGE_DRY_RUN:-0} == 1 ]]; then
	sign_into_headers "$body"
	printf '%s\n' "$body"
	cat "$tmp/headers"
	exit 0
fi

say "notifying $hook_url about $repository $ref @ $sha (${#paths[@]} changed paths)"
attempt=0
status=000
while :; do
	attempt=$((attempt + 1))
	sign_into_headers "$body"
	status=$(curl "${curl_opts[@]}" --max-time 30 -X POST \
		-H 'Content-Type: application/json' -H @"$tmp/headers" \
		--data-binary @"$tmp/body" -o "$tmp/reply" -w '%{http_code}' "$hook_url")
	curl_rc=$?
	[[ $status =~ ^[0-9]{3}$ ]] || status=000
	case $status in
	000 | 429 | 5??)
		if ((attempt < retries)); then
			if [[ $status == 000 ]]; then
				say "bridge not reachable (curl exit $curl_rc); retrying"
			else
				say "bridge answered $status; retrying"
			fi
			sleep $((2 ** attempt))
			continue
		fi
		;;
	esac
	break
done

reply=""
[[ -f $tmp/reply ]] && reply=$(<"$tmp/reply")
[[ -n $reply ]] && printf '%s\n' "$reply"

case $status in
202) ;;
200)
	say "the bridge answered 200 ($(json_field status "$reply" || echo ok)): nothing was started"
	exit 0
	;;
000) die 3 "could not reach the bridge at $hook_url (curl exit $curl_rc)" ;;
401) die 3 "401: signature refused: check the token, the hook path and the clock (300 s window)" ;;
404) die 3 "404: no Receiver at this hook path: check hook-path (gitea-flux-bridge hook-url)" ;;
*) die 3 "the bridge answered $status" ;;
esac

delivery=$(json_field delivery "$reply") || die 3 "the bridge's reply names no delivery"
say "accepted as delivery $delivery; targets:"
summarise_targets "$reply" >&2
set_output delivery "$delivery"

if ((wait_seconds == 0)); then
	set_output outcome accepted
	exit 0
fi

# --- wait -------------------------------------------------------------------------------------

# Any replica may answer, and each ask is signed afresh. A replica that is going away (a
# rollout, a node drain) ends the stream with {"retry": true}; a cut stream, a refused
# connection, a 5xx or a 429 mean the same: ask again, through the same URL, which reaches
# another replica, until the wait runs out. Only a final line or the deadline ends the wait.

printf -v started '%(%s)T' -1
deadline=$((started + wait_seconds))
deliveries_url="$base_url/deliveries/$(urlencode "$delivery")"
# With canaries the delivery also follows Flagger: promoted is ready, rolled back is failed.
canaries_query=""
[[ $wait_canaries == true ]] && canaries_query="&canaries=true"
outcome=in_progress
superseded_by=""
final_line=""
not_found=0
while :; do
	printf -v now '%(%s)T' -1
	remaining=$((deadline - now))
	((remaining > 0)) || break
	sign_read_into_headers "$delivery"
	final=""
	timed_out=""
	retry=""
	: >"$tmp/response-headers"
	curl "${curl_opts[@]}" --no-buffer --max-time $((remaining + 30)) -D "$tmp/response-headers" \
		-H @"$tmp/headers" "$deliveries_url?wait=$remaining$canaries_query" |
		while IFS= read -r line || [[ -n $line ]]; do
			[[ -n $line ]] || continue
			printf '%s\n' "$line"
			if [[ $(json_field retry "$line") == true ]]; then
				retry=$(json_field reason "$line") || retry=draining
				continue
			fi
			# Only progress lines carry an outcome (an error reply does not).
			seen=$(json_field outcome "$line") || continue
			outcome=$seen
			later=$(json_field supersededBy "$line") || later=""
			[[ -z $later ]] || superseded_by=$later
			if [[ $(json_field timeout "$line") == true ]]; then
				timed_out=1
			elif [[ $(json_field final "$line") == true || $seen == failed ]]; then
				# A failed target settles the delivery: no need to wait for the rest.
				final=1
				final_line=$line
				say "outcome: $outcome"
				summarise_targets "$line" >&2
			else
				say "progress: $outcome"
				summarise_targets "$line" >&2
			fi
		done
	curl_rc=${PIPESTATUS[0]}
	get_status=$(grep -E '^HTTP/' "$tmp/response-headers" | tail -n 1 | cut -d ' ' -f 2)
	if [[ -n $final ]]; then
		set_output outcome "$outcome"
		case $outcome in
		ready)
			if [[ $wait_canaries == true ]]; then
				# Say what was followed: a delivery with no canary promoted none.
				canaries=$(grep -oE '"role": ?"canary"' <<<"$final_line" | wc -l)
				if ((canaries > 0)); then
					say "deployed: every target is Ready at $sha and every canary promoted ($canaries)"
				else
					say "deployed: every target is Ready at $sha; no Flagger canary follows it"
				fi
			else
				say "deployed: every target is Ready at $sha"
			fi
			exit 0
			;;
		superseded)
			# Final, but no target reported this commit: never read it as "deployed".
			if [[ $accept_superseded == true ]]; then
				say "superseded: Flux went to ${superseded_by:-a later commit} before reporting $sha (accepted: accept-superseded is true)"
				exit 0
			fi
			die 4 "superseded: Flux went to ${superseded_by:-a later commit} before reporting $sha; nothing says $sha was deployed (set accept-superseded to accept this)"
			;;
		*) die 1 "deployment $outcome" ;;
		esac
	fi
	case ${get_status:-000} in
	200)
		if [[ -n $retry ]]; then
			say "the replica that answered is going away ($retry); asking again"
		elif [[ -z $timed_out ]]; then
			say "the stream ended early (curl exit $curl_rc); asking again"
		fi
		;;
	404)
		not_found=$((not_found + 1))
		((not_found < 10)) || die 3 "404: delivery $delivery is unknown to the bridge (expired?)"
		say "delivery not found on the replica that answered; retrying"
		;;
	000 | 429 | 5??)
		say "could not follow the delivery (HTTP ${get_status:-none}, curl exit $curl_rc); retrying"
		;;
	*) die 3 "following the delivery failed with HTTP $get_status" ;;
	esac
	[[ -n $timed_out ]] || sleep 1
done

set_output outcome "$outcome"
die 1 "the wait of ${wait_seconds}s ran out; outcome so far: $outcome"
