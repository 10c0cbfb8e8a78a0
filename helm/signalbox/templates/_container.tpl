{{/*
The proxy container, shared by the Deployment and the sidecar templates.
Argument: (dict "ctx" <context with .Values/.Release> "sidecar" <bool>).
*/}}
{{- define "signalbox.container" -}}
{{- $ctx := .ctx -}}
{{- $v := $ctx.Values -}}
{{- $native := and .sidecar $v.sidecar.native -}}
{{- $preStop := include "signalbox.effectivePreStopType" (dict "ctx" $ctx "sidecar" .sidecar) -}}
{{- if $native -}}{{- include "signalbox.requireNativeSidecars" $ctx -}}{{- end -}}
- name: signalbox
  image: {{ include "signalbox.image" $ctx | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if $native }}
  # Native sidecar: an init container that keeps running for the pod's lifetime.
  restartPolicy: Always
  {{- end }}
  args:
    - serve
    - --policies
    - /etc/signalbox/policies
    # 0.0.0.0 even as a sidecar: the kubelet probes the pod IP, not loopback.
    - --host
    - 0.0.0.0
    - --port
    - {{ $v.server.port | int | quote }}
    - --admin-host
    - {{ $v.admin.host | quote }}
    - --admin-port
    - {{ $v.server.adminPort | int | quote }}
    {{- if not (include "signalbox.adminAuth" $ctx) }}
    # admin.auth: false (loopback only): any container sharing the pod's network may use the admin API.
    - --admin-no-auth
    {{- end }}
    - --shutdown-grace
    - {{ printf "%ds" ($v.server.shutdownGraceSeconds | int) | quote }}
    - --drain-timeout
    - {{ printf "%ds" ($v.server.drainTimeoutSeconds | int) | quote }}
    {{- with $v.server.clientTimeouts }}
    - --header-timeout
    - {{ printf "%ds" (.headerSeconds | int) | quote }}
    - --body-idle-timeout
    - {{ printf "%ds" (.bodyIdleSeconds | int) | quote }}
    - --body-timeout
    - {{ printf "%ds" (.bodySeconds | int) | quote }}
    - --keepalive-timeout
    - {{ printf "%ds" (.keepAliveSeconds | int) | quote }}
    {{- end }}
    {{- range $v.server.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  ports:
    - name: {{ ternary "signalbox-http" "http" .sidecar }}
      containerPort: {{ $v.server.port | int }}
      protocol: TCP
    {{- if include "signalbox.adminExposed" $ctx }}
    - name: {{ ternary "signalbox-admin" "admin" .sidecar }}
      containerPort: {{ $v.server.adminPort | int }}
      protocol: TCP
    {{- end }}
  {{- if or $v.envFromSecrets $v.secretValues }}
  envFrom:
    {{- range $v.envFromSecrets }}
    - secretRef:
        name: {{ . | quote }}
    {{- end }}
    {{- if $v.secretValues }}
    - secretRef:
        name: {{ include "signalbox.envSecretName" $ctx | quote }}
    {{- end }}
  {{- end }}
  {{- $env := include "signalbox.envItems" $ctx | trim }}
  {{- if $env }}
  env:
    {{- $env | nindent 4 }}
  {{- end }}
  {{- $portName := ternary "signalbox-http" "http" .sidecar }}
  {{- with $v.probes.startup }}
  startupProbe:
    httpGet:
      path: {{ .path }}
      port: {{ $portName }}
    periodSeconds: {{ .periodSeconds }}
    timeoutSeconds: {{ .timeoutSeconds }}
    failureThreshold: {{ .failureThreshold }}
  {{- end }}
  {{- with $v.probes.readiness }}
  readinessProbe:
    httpGet:
      path: {{ .path }}
      port: {{ $portName }}
    periodSeconds: {{ .periodSeconds }}
    timeoutSeconds: {{ .timeoutSeconds }}
    failureThreshold: {{ .failureThreshold }}
  {{- end }}
  {{- with $v.probes.liveness }}
  livenessProbe:
    httpGet:
      path: {{ .path }}
      port: {{ $portName }}
    periodSeconds: {{ .periodSeconds }}
    timeoutSeconds: {{ .timeoutSeconds }}
    failureThreshold: {{ .failureThreshold }}
  {{- end }}
  {{- if eq $preStop "sleep" }}
  lifecycle:
    preStop:
      sleep:
        seconds: {{ $v.lifecycle.preStop.seconds | int }}
  {{- else if eq $preStop "exec" }}
  lifecycle:
    preStop:
      exec:
        command: ["sleep", {{ $v.lifecycle.preStop.seconds | int | quote }}]
  {{- end }}
  {{- with $v.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  volumeMounts:
    # The whole directory, never subPath: a subPath mount never sees ConfigMap updates, and the
    # proxy hot-reloads by watching the directory's ..data symlink swap.
    - name: {{ ternary "signalbox-policies" "policies" .sidecar }}
      mountPath: /etc/signalbox/policies
      readOnly: true
    - name: {{ ternary "signalbox-tmp" "tmp" .sidecar }}
      mountPath: /tmp
    {{- if $v.secretFiles }}
    # Whole directory again: a subPath mount would never see a rotated Secret.
    - name: {{ ternary "signalbox-secrets" "secrets" .sidecar }}
      mountPath: /etc/signalbox/secrets
      readOnly: true
    {{- end }}
{{- end -}}

{{/* The proxy's volumes. Argument: (dict "ctx" <context> "sidecar" <bool>). */}}
{{- define "signalbox.volumes" -}}
{{- $ctx := .ctx -}}
- name: {{ ternary "signalbox-policies" "policies" .sidecar }}
  configMap:
    name: {{ include "signalbox.policiesConfigMapName" $ctx | quote }}
- name: {{ ternary "signalbox-tmp" "tmp" .sidecar }}
  emptyDir:
    sizeLimit: {{ $ctx.Values.tmpSizeLimit | quote }}
{{- with $ctx.Values.secretFiles }}
# secretFiles: each key at /etc/signalbox/secrets/<name>; the proxy reads it through <name>_FILE.
- name: {{ ternary "signalbox-secrets" "secrets" $.sidecar }}
  projected:
    # 0444: in sidecar mode the app's pod may set no fsGroup, and the proxy runs as UID 10001.
    defaultMode: 0444
    sources:
      {{- range . }}
      - secret:
          name: {{ required "signalbox: every secretFiles entry needs a secretName" .secretName | quote }}
          items:
            - key: {{ required "signalbox: every secretFiles entry needs a key" .key | quote }}
              path: {{ required "signalbox: every secretFiles entry needs a name" .name | quote }}
          {{- if hasKey . "optional" }}
          optional: {{ .optional }}
          {{- end }}
      {{- end }}
{{- end }}
{{- end -}}

{{/* Environment entries: admin token, Redis URL, secret keys, extra env. Argument: a context. */}}
{{- define "signalbox.envItems" -}}
{{- $v := .Values -}}
{{- $ctx := . -}}
{{- if include "signalbox.adminAuth" $ctx }}
- name: SIGNALBOX_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "signalbox.adminSecretName" $ctx | quote }}
      key: {{ $v.admin.secretKey | quote }}
{{- end }}
{{- if $v.redis.existingSecret }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $v.redis.existingSecret | quote }}
      key: {{ $v.redis.secretKey | quote }}
{{- else if $v.redis.url }}
- name: REDIS_URL
  value: {{ $v.redis.url | quote }}
{{- end }}
{{- range $v.secretEnv }}
- name: {{ required "signalbox: every secretEnv entry needs a name" .name | quote }}
  valueFrom:
    secretKeyRef:
      name: {{ required "signalbox: every secretEnv entry needs a secretName" .secretName | quote }}
      key: {{ required "signalbox: every secretEnv entry needs a key" .key | quote }}
      {{- if hasKey . "optional" }}
      optional: {{ .optional }}
      {{- end }}
{{- end }}
{{- range $v.secretFiles }}
- name: {{ printf "%s_FILE" .name | quote }}
  value: {{ printf "/etc/signalbox/secrets/%s" .name | quote }}
{{- end }}
{{- with $v.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}
