{{/*
Public named templates for adding Signalbox to another chart's pods (mode: sidecar).
Call them with this chart's context: either .Subcharts.signalbox when signalbox is a dependency
of your chart, or (dict "Values" .Values.signalbox "Release" .Release "Capabilities" .Capabilities).

  spec:
    terminationGracePeriodSeconds: {{ include "signalbox.terminationGracePeriodSeconds" .Subcharts.signalbox }}
    initContainers:            # sidecar.native: true (Kubernetes >= 1.29; the render fails on older)
      {{- include "signalbox.sidecarContainer" .Subcharts.signalbox | nindent 6 }}
    containers:
      - name: app
        env:
          - name: OPENAI_BASE_URL
            value: http://127.0.0.1:8080/v1
      # with sidecar.native: false, include signalbox.sidecarContainer here instead
    volumes:
      {{- include "signalbox.sidecarVolumes" .Subcharts.signalbox | nindent 6 }}

and, in the pod template's metadata (Prometheus scrape annotations and checksum/secrets):

  annotations:
    {{- include "signalbox.podAnnotations" .Subcharts.signalbox | nindent 4 }}

The first two render YAML list items, the last map entries: the scrape annotations (when
metrics.podAnnotations is on) and checksum/secrets (when rollOnSecretChange is on), which rolls
your pods when a secret the sidecar reads changes. Names are prefixed (container "signalbox", ports
"signalbox-http"/"signalbox-admin", volumes "signalbox-policies"/"signalbox-tmp"/"signalbox-secrets")
to avoid clashing with the app's.
*/}}

{{- define "signalbox.sidecarContainer" -}}
{{- include "signalbox.container" (dict "ctx" . "sidecar" true) -}}
{{- end -}}

{{- define "signalbox.sidecarVolumes" -}}
{{- include "signalbox.volumes" (dict "ctx" . "sidecar" true) -}}
{{- end -}}


{{- define "signalbox.podAnnotations" -}}
{{- $a := dict -}}
{{- if .Values.metrics.podAnnotations -}}
{{- $_ := set $a "prometheus.io/scrape" "true" -}}
{{- $_ := set $a "prometheus.io/port" (.Values.server.port | int | toString) -}}
{{- $_ := set $a "prometheus.io/path" "/metrics" -}}
{{- end -}}
{{- if .Values.rollOnSecretChange -}}
{{- $_ := set $a "checksum/secrets" (include "signalbox.secretsChecksum" .) -}}
{{- end -}}
{{- if $a -}}{{- toYaml $a -}}{{- end -}}
{{- end -}}
