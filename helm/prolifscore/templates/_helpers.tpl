{{/* Chart name, truncated to the DNS label limit. */}}
{{- define "prolifscore.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped base name of every object. */}}
{{- define "prolifscore.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "prolifscore.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels; call with (dict "ctx" $ "component" "tiling"). */}}
{{- define "prolifscore.selectorLabels" -}}
app.kubernetes.io/name: {{ include "prolifscore.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{/* Recommended labels (Kubernetes conventions) + Helm's; same arguments as selectorLabels. */}}
{{- define "prolifscore.labels" -}}
{{ include "prolifscore.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: prolifscore
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ include "prolifscore.chart" .ctx }}
{{- end }}

{{/* repository:tag[@digest]; call with an image dict. */}}
{{- define "prolifscore.imageRef" -}}
{{- if .digest }}
{{- printf "%s:%s@%s" .repository .tag .digest }}
{{- else }}
{{- printf "%s:%s" .repository .tag }}
{{- end }}
{{- end }}

{{- define "prolifscore.image" -}}
{{ include "prolifscore.imageRef" .Values.image }}
{{- end }}

{{- define "prolifscore.gpuImage" -}}
{{ include "prolifscore.imageRef" .Values.gpuImage }}
{{- end }}

{{- define "prolifscore.kafkaName" -}}
{{ include "prolifscore.fullname" . }}-kafka
{{- end }}

{{/* The bootstrap address the services and KEDA use (fully qualified: KEDA resolves it from its
own namespace). */}}
{{- define "prolifscore.kafkaBootstrap" -}}
{{- if eq .Values.kafka.mode "bundled" }}
{{- printf "%s-kafka-bootstrap.%s.svc:9092" (include "prolifscore.kafkaName" .) .Release.Namespace }}
{{- else }}
{{- required "kafka.externalBootstrap is required when kafka.mode is external" .Values.kafka.externalBootstrap }}
{{- end }}
{{- end }}

{{- define "prolifscore.rayName" -}}
{{ include "prolifscore.fullname" . }}-ray
{{- end }}

{{- define "prolifscore.rayAuthSecret" -}}
{{- default (printf "%s-ray-auth" (include "prolifscore.fullname" .)) .Values.ray.existingAuthSecret }}
{{- end }}

{{- define "prolifscore.envConfigMap" -}}
{{ include "prolifscore.fullname" . }}-env
{{- end }}

{{/* PVC name of a volume; call with (dict "ctx" $ "name" "slides"). */}}
{{- define "prolifscore.claimName" -}}
{{- $s := index .ctx.Values.storage .name }}
{{- default (printf "%s-%s" (include "prolifscore.fullname" .ctx) .name) $s.existingClaim }}
{{- end }}

{{- define "prolifscore.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.runAsUser }}
runAsGroup: {{ .Values.runAsGroup }}
fsGroup: {{ .Values.runAsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Pod Security Standards "restricted" for a container. */}}
{{- define "prolifscore.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Env of containers that join the Ray cluster (Ray Client token). */}}
{{- define "prolifscore.rayClientEnv" -}}
{{- if .Values.ray.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "prolifscore.rayAuthSecret" . }}
      key: auth_token
{{- end }}
{{- end }}

{{/* A value as an environment string: whole numbers stay integers (YAML numbers arrive as
float64, which would print 8388608 as 8.388608e+06). */}}
{{- define "prolifscore.envValue" -}}
{{- if and (kindIs "float64" .) (eq . (float64 (int64 .))) }}
{{- int64 . | toString | quote }}
{{- else }}
{{- toString . | quote }}
{{- end }}
{{- end }}

{{/* extraEnv map -> env list. */}}
{{- define "prolifscore.extraEnv" -}}
{{- range $k, $v := . }}
- name: {{ $k }}
  value: {{ include "prolifscore.envValue" $v }}
{{- end }}
{{- end }}

{{/* Preferred anti-affinity + zone spread for a component; (dict "ctx" $ "component" c). */}}
{{- define "prolifscore.spread" -}}
{{- if .ctx.Values.spread }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "prolifscore.selectorLabels" . | nindent 14 }}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "prolifscore.selectorLabels" . | nindent 8 }}
{{- end }}
{{- end }}

{{- define "prolifscore.gpuScheduling" -}}
{{- with .Values.gpu.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.gpu.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* gRPC probes on a port (startup, readiness, liveness); TCP checks when TLS is on. */}}
{{- define "prolifscore.grpcProbes" -}}
{{- $check := dict "grpc" (dict "port" .port) }}
{{- if .tls }}
{{- $check = dict "tcpSocket" (dict "port" .port) }}
{{- end }}
startupProbe:
  {{- toYaml $check | nindent 2 }}
  periodSeconds: 5
  failureThreshold: 60
readinessProbe:
  {{- toYaml $check | nindent 2 }}
  periodSeconds: 10
livenessProbe:
  {{- toYaml $check | nindent 2 }}
  periodSeconds: 20
  failureThreshold: 3
{{- end }}
