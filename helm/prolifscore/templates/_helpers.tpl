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
own namespace). Bundled: the TLS + SCRAM-SHA-512 listener. */}}
{{- define "prolifscore.kafkaBootstrap" -}}
{{- if eq .Values.kafka.mode "bundled" }}
{{- printf "%s-kafka-bootstrap.%s.svc:9093" (include "prolifscore.kafkaName" .) .Release.Namespace }}
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

{{/* Pod security of the Strimzi pods (Strimzi picks the user; the image's is non-root). */}}
{{- define "prolifscore.strimziPodSecurity" -}}
runAsNonRoot: true
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

{{/* gRPC probes on a port (startup, readiness, liveness); TCP checks when TLS is on (the
kubelet's gRPC probe speaks plaintext). Liveness asks for the health name that stays SERVING
while the process runs, whatever the broker does; readiness for "" (NOT_SERVING while the
broker is unreachable: a restart would not bring it back). */}}
{{- define "prolifscore.grpcProbes" -}}
{{- $check := dict "grpc" (dict "port" .port) }}
{{- $alive := dict "grpc" (dict "port" .port "service" "prolifscore.liveness") }}
{{- if .tls }}
{{- $check = dict "tcpSocket" (dict "port" .port) }}
{{- $alive = $check }}
{{- end }}
startupProbe:
  {{- toYaml $check | nindent 2 }}
  periodSeconds: 5
  failureThreshold: 60
readinessProbe:
  {{- toYaml $check | nindent 2 }}
  periodSeconds: 10
livenessProbe:
  {{- toYaml $alive | nindent 2 }}
  periodSeconds: 20
  failureThreshold: 3
{{- end }}

{{/* How the services reach Kafka, as JSON (fromJson): protocol, tls, sasl, mechanism, ca
(Secret, key) and clientCert (Secret). Bundled: TLS + SCRAM-SHA-512 with Strimzi's cluster CA. */}}
{{- define "prolifscore.kafkaSecurity" -}}
{{- $k := .Values.kafka }}
{{- if eq $k.mode "bundled" }}
{{- dict "protocol" "SASL_SSL" "tls" true "sasl" true "mechanism" "SCRAM-SHA-512" "caSecret" (printf "%s-cluster-ca-cert" (include "prolifscore.kafkaName" .)) "caKey" "ca.crt" "clientCert" "" | toJson }}
{{- else }}
{{- $e := $k.external }}
{{- $tls := has $e.securityProtocol (list "SSL" "SASL_SSL") }}
{{- $sasl := has $e.securityProtocol (list "SASL_PLAINTEXT" "SASL_SSL") }}
{{- $cert := ternary $e.clientCertSecret "" (eq $e.securityProtocol "SSL") }}
{{- dict "protocol" $e.securityProtocol "tls" $tls "sasl" $sasl "mechanism" $e.saslMechanism "caSecret" (ternary $e.caSecret "" $tls) "caKey" $e.caKey "clientCert" $cert | toJson }}
{{- end }}
{{- end }}

{{/* ConfigMap entries (PROLIF_KAFKA_*) for the Kafka security settings every service shares. */}}
{{- define "prolifscore.kafkaSecurityEnv" -}}
{{- $s := include "prolifscore.kafkaSecurity" . | fromJson }}
PROLIF_KAFKA_SECURITY_PROTOCOL: {{ $s.protocol | quote }}
{{- if $s.caSecret }}
PROLIF_KAFKA_SSL_CA_FILE: /etc/prolifscore/kafka/ca.crt
{{- end }}
{{- if $s.clientCert }}
PROLIF_KAFKA_SSL_CERT_FILE: /etc/prolifscore/kafka/client.crt
PROLIF_KAFKA_SSL_KEY_FILE: /etc/prolifscore/kafka/client.key
{{- end }}
{{- if $s.sasl }}
PROLIF_KAFKA_SASL_MECHANISM: {{ $s.mechanism | quote }}
PROLIF_KAFKA_SASL_PASSWORD_FILE: /etc/prolifscore/kafka/password
{{- end }}
{{- end }}

{{/* A service's Kafka user: (dict "ctx" $ "service" "tiling") -> {username, secret, key}. Bundled:
the KafkaUser <fullname>-<service> and the Secret Strimzi makes for it. */}}
{{- define "prolifscore.kafkaUser" -}}
{{- if eq .ctx.Values.kafka.mode "bundled" }}
{{- $name := printf "%s-%s" (include "prolifscore.fullname" .ctx) .service }}
{{- dict "username" $name "secret" $name "key" "password" | toJson }}
{{- else }}
{{- $u := index .ctx.Values.kafka.external.users .service }}
{{- $where := printf "kafka.external.users.%s" .service }}
{{- $user := required (printf "%s.username is required with SASL" $where) $u.username }}
{{- $secret := required (printf "%s.passwordSecret is required with SASL" $where) $u.passwordSecret }}
{{- dict "username" $user "secret" $secret "key" $u.passwordKey | toJson }}
{{- end }}
{{- end }}

{{/* Env of a Kafka client container: its SASL user name. (dict "ctx" $ "service" s) */}}
{{- define "prolifscore.kafkaClientEnv" -}}
{{- $s := include "prolifscore.kafkaSecurity" .ctx | fromJson }}
{{- if $s.sasl }}
- name: PROLIF_KAFKA_SASL_USERNAME
  value: {{ (include "prolifscore.kafkaUser" . | fromJson).username | quote }}
{{- end }}
{{- end }}

{{/* The kafka-credentials mount (CA, client certificate, SASL password), if any. */}}
{{- define "prolifscore.kafkaClientMount" -}}
{{- $s := include "prolifscore.kafkaSecurity" . | fromJson }}
{{- if or $s.caSecret $s.clientCert $s.sasl }}
- name: kafka-credentials
  mountPath: /etc/prolifscore/kafka
  readOnly: true
{{- end }}
{{- end }}

{{/* The kafka-credentials volume of a service: (dict "ctx" $ "service" s). */}}
{{- define "prolifscore.kafkaClientVolume" -}}
{{- $s := include "prolifscore.kafkaSecurity" .ctx | fromJson }}
{{- if or $s.caSecret $s.clientCert $s.sasl }}
- name: kafka-credentials
  projected:
    sources:
      {{- if $s.caSecret }}
      - secret:
          name: {{ $s.caSecret }}
          items: [{key: {{ $s.caKey }}, path: ca.crt}]
      {{- end }}
      {{- if $s.clientCert }}
      - secret:
          name: {{ $s.clientCert }}
          items: [{key: tls.crt, path: client.crt}, {key: tls.key, path: client.key}]
      {{- end }}
      {{- if $s.sasl }}
      {{- $u := include "prolifscore.kafkaUser" . | fromJson }}
      - secret:
          name: {{ $u.secret }}
          items: [{key: {{ $u.key }}, path: password}]
      {{- end }}
{{- end }}
{{- end }}

{{/* gRPC mutual TLS Secret of a service (tls.crt, tls.key, ca.crt); (dict "ctx" $ "service" s)
with s one of tiling, filtering, scoring, training, viewer, modelServer. */}}
{{- define "prolifscore.tlsSecret" -}}
{{- if .ctx.Values.tls.certManager.enabled }}
{{- printf "%s-%s-tls" (include "prolifscore.fullname" .ctx) (ternary "tfserving" .service (eq .service "modelServer")) }}
{{- else }}
{{- required (printf "tls.secrets.%s is required when tls.enabled and not tls.certManager.enabled" .service) (index .ctx.Values.tls.secrets .service) }}
{{- end }}
{{- end }}
