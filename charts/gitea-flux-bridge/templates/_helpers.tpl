{{/* Chart name, truncated to the 63 characters a label value may hold. */}}
{{- define "gfb.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name of the release's objects. */}}
{{- define "gfb.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "gfb.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gfb.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gfb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "gfb.labels" -}}
helm.sh/chart: {{ include "gfb.chart" . }}
{{ include "gfb.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gitea-flux-bridge
{{- end -}}

{{- define "gfb.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "gfb.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "gfb.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Where the configuration file and the existing Secret's files are mounted. */}}
{{- define "gfb.configDir" -}}/etc/gitea-flux-bridge{{- end -}}
{{- define "gfb.secretsDir" -}}/etc/gitea-flux-bridge/secrets{{- end -}}
{{- define "gfb.containerPort" -}}8080{{- end -}}

{{/*
The configuration file: the `config` values 1:1, plus what the chart owns (listen address,
watched namespaces, cluster name). Fails without a clusterName, and when the configuration names
a file of the existing Secret but no existingSecret is set.
*/}}
{{- define "gfb.config" -}}
{{- $cfg := deepCopy (default (dict) .Values.config) -}}
{{- $_ := set $cfg "cluster_name" (include "gfb.clusterName" .) -}}
{{- $_ := set $cfg "listen" (dict "host" "0.0.0.0" "port" 8080) -}}
{{- $_ := set $cfg "namespaces" (default (list) .Values.watchNamespaces) -}}
{{- $statuses := deepCopy (default (dict) $cfg.statuses) -}}
{{- $_ := set $statuses "lease_name" (include "gfb.leaseName" .) -}}
{{- $_ := set $cfg "statuses" $statuses -}}
{{- $text := toYaml $cfg -}}
{{- if and (contains (include "gfb.secretsDir" .) $text) (not .Values.existingSecret) -}}
{{- fail (printf "config refers to files in %s: set existingSecret to the Secret that holds them" (include "gfb.secretsDir" .)) -}}
{{- end -}}
{{- $text -}}
{{- end -}}

{{/*
The cluster name, required: two clusters installed with the same name overwrite each other's
commit statuses in Gitea.
*/}}
{{- define "gfb.clusterName" -}}
{{- $name := required "clusterName is required: set it to this cluster's (or region's) name, unique among the clusters that post statuses to the same Gitea, e.g. --set clusterName=eu-west" .Values.clusterName -}}
{{- if regexMatch "[{}\n]" $name -}}
{{- fail (printf "clusterName %q must not contain '{', '}' or a newline" $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{/* The Lease's name, from the configuration (the Role is restricted to it). */}}
{{- define "gfb.leaseName" -}}
{{- $statuses := default (dict) .Values.config.statuses -}}
{{- default (printf "%s-resync" (include "gfb.fullname" .)) $statuses.lease_name -}}
{{- end -}}

{{/* The RBAC rules on Flux objects and Secrets (least privilege), for a ClusterRole or Role. */}}
{{- define "gfb.fluxRules" -}}
- apiGroups: ["notification.toolkit.fluxcd.io"]
  resources: ["receivers"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["source.toolkit.fluxcd.io"]
  resources: ["gitrepositories", "ocirepositories"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["kustomize.toolkit.fluxcd.io"]
  resources: ["kustomizations"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["helm.toolkit.fluxcd.io"]
  resources: ["helmreleases"]
  verbs: ["get", "list", "watch", "patch"]
# Cached (when their CRD is installed) to route Gitea package events by registry URL, chart
# and version range, image and tag policy; annotated by name on Git pushes.
- apiGroups: ["source.toolkit.fluxcd.io"]
  resources: ["helmrepositories", "helmcharts"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["image.toolkit.fluxcd.io"]
  resources: ["imagerepositories", "imagepolicies"]
  verbs: ["get", "list", "watch", "patch"]
# flux-operator's input providers (when its CRD is installed): cached to route Gitea pull
# request, branch and tag events by repository and filters.
- apiGroups: ["fluxcd.controlplane.io"]
  resources: ["resourcesetinputproviders"]
  verbs: ["get", "list", "watch", "patch"]
# The other kinds a Receiver may list: annotated by name on every request, as Flux does, never
# read or cached (so `name: "*"` is not resolved for them: that would need `list`).
- apiGroups: ["source.toolkit.fluxcd.io"]
  resources: ["buckets", "externalartifacts"]
  verbs: ["patch"]
- apiGroups: ["image.toolkit.fluxcd.io"]
  resources: ["imageupdateautomations"]
  verbs: ["patch"]
- apiGroups: ["source.extensions.fluxcd.io"]
  resources: ["artifactgenerators"]
  verbs: ["patch"]
# Only the Secrets that Receivers reference, by name: get, never list or watch.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# Kubernetes Events on the Receivers and the objects a push annotates (aggregated and
# rate-bounded): create a new one, patch its count. Never read, list or delete.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}

{{/*
Flagger canaries (config.statuses.canaries.enabled): the Canaries, and the workloads they target,
whose labels say which Kustomization or HelmRelease applied them. Read only; granted only when on.
*/}}
{{- define "gfb.canaryRules" -}}
- apiGroups: ["flagger.app"]
  resources: ["canaries"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["apps"]
  resources: ["deployments", "daemonsets"]
  verbs: ["get", "list", "watch"]
{{- end -}}

{{/*
The pod's grace period, from the start of the preStop hook to SIGKILL: the preStop sleep, the
drain, requests in progress, the status queue flush (config.shutdown) and 5 s to close the
watches and exit. ?wait streams (up to config.deliveries.max_wait_seconds) are not part of it:
they end with a `retry` line when the drain begins. An explicit value below the sum fails.
*/}}
{{- define "gfb.terminationGracePeriodSeconds" -}}
{{- $shutdown := default (dict) .Values.config.shutdown -}}
{{- $need := float64 (default 0 .Values.preStopSleepSeconds) -}}
{{- range $key, $fallback := dict "drain_seconds" 5 "in_flight_seconds" 10 "flush_seconds" 10 -}}
{{- $need = addf $need (ternary (index $shutdown $key) $fallback (hasKey $shutdown $key)) -}}
{{- end -}}
{{- $need = addf $need 5 | ceil | int -}}
{{- $set := .Values.terminationGracePeriodSeconds -}}
{{- if kindIs "invalid" $set -}}
{{- $need -}}
{{- else if lt (int $set) $need -}}
{{- fail (printf "terminationGracePeriodSeconds %d is shorter than a shutdown may take: %d s (preStopSleepSeconds + config.shutdown.drain_seconds + in_flight_seconds + flush_seconds + 5)" (int $set) $need) -}}
{{- else -}}
{{- int $set -}}
{{- end -}}
{{- end -}}
