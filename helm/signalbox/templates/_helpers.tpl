{{/*
Names, labels and small computed values.
Helpers used by the sidecar templates read only .Values, .Release and (optionally) .Chart and
.Capabilities, so another chart can call them with (dict "Values" ... "Release" .Release).
*/}}

{{- define "signalbox.name" -}}
{{- default "signalbox" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "signalbox.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "signalbox.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "signalbox.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "signalbox.selectorLabels" -}}
app.kubernetes.io/name: {{ include "signalbox.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "signalbox.labels" -}}
helm.sh/chart: {{ include "signalbox.chart" . }}
{{ include "signalbox.selectorLabels" . }}
app.kubernetes.io/version: {{ include "signalbox.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "signalbox.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "signalbox.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The image tag: image.tag, else this chart's appVersion (never an including chart's). */}}
{{- define "signalbox.imageTag" -}}
{{- $tag := .Values.image.tag | toString -}}
{{- if and (not $tag) .Chart (eq .Chart.Name "signalbox") -}}
{{- $tag = .Chart.AppVersion -}}
{{- end -}}
{{- required "signalbox: set image.tag (the chart's appVersion is not available here)" $tag -}}
{{- end -}}

{{- define "signalbox.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "signalbox.imageTag" .) -}}
{{- end -}}

{{- define "signalbox.policiesConfigMapName" -}}
{{- if .Values.existingConfigMap -}}
{{- .Values.existingConfigMap -}}
{{- else -}}
{{- printf "%s-policies" (include "signalbox.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/*
"true" when the admin API requires the token: admin.auth, which may be turned off only on loopback.
*/}}
{{- define "signalbox.adminAuth" -}}
{{- if .Values.admin.auth -}}true
{{- else if include "signalbox.adminExposed" . -}}
{{- fail "signalbox: admin.auth: false needs a loopback admin.host (127.0.0.1, ::1): an exposed admin API always needs the token" -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the admin token: admin.existingSecret, else the one this chart generates. */}}
{{- define "signalbox.adminSecretName" -}}
{{- if .Values.admin.existingSecret -}}
{{- .Values.admin.existingSecret -}}
{{- else -}}
{{- printf "%s-admin" (include "signalbox.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The Secret this chart creates from secretValues. */}}
{{- define "signalbox.envSecretName" -}}
{{- printf "%s-env" (include "signalbox.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Native sidecars (an init container with restartPolicy: Always) exist from Kubernetes 1.29; an older
API server would drop the field and run the proxy as a plain init container that never ends, so the
pod would never start. Fail the render instead. Skipped when the caller passes no .Capabilities.
*/}}
{{- define "signalbox.requireNativeSidecars" -}}
{{- if .Capabilities -}}
{{- if semverCompare "<1.29.0-0" .Capabilities.KubeVersion.Version -}}
{{- fail (printf "signalbox: sidecar.native: true needs Kubernetes >= 1.29 (native sidecars); this cluster is %s: set sidecar.native: false (the proxy then runs as a plain container next to the app)" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
checksum/secrets: a digest of every secret value the proxy reads from its environment or files that
Helm can see: secretValues, and the data of each referenced Secret that exists in the cluster at
install/upgrade time (lookup returns nothing under `helm template`). A changed digest rolls the pods.
Policies are left out on purpose: they hot-reload.
*/}}
{{- define "signalbox.secretsChecksum" -}}
{{- $v := .Values -}}
{{- $names := concat $v.envFromSecrets (list (include "signalbox.adminSecretName" .)) -}}
{{- range concat $v.secretEnv $v.secretFiles -}}{{- $names = append $names .secretName -}}{{- end -}}
{{- if $v.redis.existingSecret -}}{{- $names = append $names $v.redis.existingSecret -}}{{- end -}}
{{- $seen := dict -}}
{{- if .Release -}}
{{- range $names | uniq | sortAlpha -}}
{{- $found := lookup "v1" "Secret" $.Release.Namespace . -}}
{{- if $found -}}{{- $_ := set $seen . ($found.data | default dict) -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- dict "values" $v.secretValues "cluster" $seen | toJson | sha256sum -}}
{{- end -}}

{{/* "true" when the admin API listens beyond the pod's loopback. */}}
{{- define "signalbox.adminExposed" -}}
{{- if not (has (toString .Values.admin.host) (list "127.0.0.1" "localhost" "::1")) -}}true{{- end -}}
{{- end -}}

{{/*
The preStop hook type actually used: sleep, exec or none. Argument: (dict "ctx" $ "type" <type>).
"auto" picks the native sleep action when the cluster supports it (1.30+, on by default).
*/}}
{{- define "signalbox.preStopType" -}}
{{- $type := .type -}}
{{- if eq $type "auto" -}}
{{- $caps := .ctx.Capabilities -}}
{{- if or (not $caps) (semverCompare ">=1.30.0-0" $caps.KubeVersion.Version) -}}sleep{{- else -}}exec{{- end -}}
{{- else if has $type (list "sleep" "exec" "none") -}}
{{- $type -}}
{{- else -}}
{{- fail (printf "signalbox: preStop type must be auto, sleep, exec or none, not %q" $type) -}}
{{- end -}}
{{- end -}}

{{/*
The preStop type of the proxy container. Argument: (dict "ctx" $ "sidecar" <bool>). A native
sidecar gets SIGTERM only after every app container has exited, so by default it has nothing to
wait for.
*/}}
{{- define "signalbox.effectivePreStopType" -}}
{{- $v := .ctx.Values -}}
{{- $type := $v.lifecycle.preStop.type -}}
{{- if and .sidecar (ne $v.sidecar.preStopType "auto") -}}
{{- $type = $v.sidecar.preStopType -}}
{{- else if and .sidecar $v.sidecar.native -}}
{{- $type = "none" -}}
{{- end -}}
{{- include "signalbox.preStopType" (dict "ctx" .ctx "type" $type) -}}
{{- end -}}

{{/*
terminationGracePeriodSeconds: the explicit value, else preStop + shutdown grace + drain + 10 s.
The whole pod shares one grace budget, so in sidecar mode include this in the app's pod spec
(and add the app's own shutdown time if it is long).
*/}}
{{- define "signalbox.terminationGracePeriodSeconds" -}}
{{- if not (kindIs "invalid" .Values.terminationGracePeriodSeconds) -}}
{{- .Values.terminationGracePeriodSeconds | int -}}
{{- else -}}
{{- $preStop := 0 -}}
{{- if ne (include "signalbox.effectivePreStopType" (dict "ctx" . "sidecar" (eq .Values.mode "sidecar"))) "none" -}}
{{- $preStop = .Values.lifecycle.preStop.seconds | int -}}
{{- end -}}
{{- add $preStop (.Values.server.shutdownGraceSeconds | int) (.Values.server.drainTimeoutSeconds | int) 10 -}}
{{- end -}}
{{- end -}}

{{/*
PromQL label matchers in braces: (list <scoping matchers> <extra matchers>), either may be empty;
nothing at all when both are.
*/}}
{{- define "signalbox.promMatchers" -}}
{{- $parts := list -}}
{{- range . -}}
{{- if . -}}{{- $parts = append $parts . -}}{{- end -}}
{{- end -}}
{{- if $parts -}}{{ printf "{%s}" (join "," $parts) }}{{- end -}}
{{- end -}}
