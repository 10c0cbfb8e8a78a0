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

{{/* "true" when the admin API listens beyond the pod's loopback (it then needs a token). */}}
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
