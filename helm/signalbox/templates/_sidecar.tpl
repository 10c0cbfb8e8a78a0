{{/*
Public named templates for adding Signalbox to another chart's pods (mode: sidecar).
Call them with this chart's context: either .Subcharts.signalbox when signalbox is a dependency
of your chart, or (dict "Values" .Values.signalbox "Release" .Release "Capabilities" .Capabilities).

  spec:
    terminationGracePeriodSeconds: {{ include "signalbox.terminationGracePeriodSeconds" .Subcharts.signalbox }}
    initContainers:            # sidecar.native: true (Kubernetes >= 1.29)
      {{- include "signalbox.sidecarContainer" .Subcharts.signalbox | nindent 6 }}
    containers:
      - name: app
        env:
          - name: OPENAI_BASE_URL
            value: http://127.0.0.1:8080/v1
      # with sidecar.native: false, include signalbox.sidecarContainer here instead
    volumes:
      {{- include "signalbox.sidecarVolumes" .Subcharts.signalbox | nindent 6 }}

Both render YAML list items. Names are prefixed (container "signalbox", ports "signalbox-http"/
"signalbox-admin", volumes "signalbox-policies"/"signalbox-tmp") to avoid clashing with the app's.
*/}}

{{- define "signalbox.sidecarContainer" -}}
{{- include "signalbox.container" (dict "ctx" . "sidecar" true) -}}
{{- end -}}

{{- define "signalbox.sidecarVolumes" -}}
{{- include "signalbox.volumes" (dict "ctx" . "sidecar" true) -}}
{{- end -}}
