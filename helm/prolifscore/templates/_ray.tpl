{{/*
A Ray pod template (RayCluster / RayJob head or worker group). Arguments (dict):
  ctx          root context
  component    app.kubernetes.io/component label (ray-head, ray-worker, training-ray-head, ...)
  cluster      prolifscore.io/ray-cluster label (services | training): NetworkPolicy scope
  head         true for a head pod
  image        image reference
  resources    resources map
  shmSize      /dev/shm (memory emptyDir) size
  volumes      "services" (slides ro + tiles rw) or "training" (tiles ro + models rw)
  driverEnv    true: the pod runs the job driver (gets the shared env, training settings and the
               training Kafka user, for `prolifscore train --publish`)
  trainWorkers PROLIF_TRAIN_WORKERS of the driver (the worker group's size)
  gpu          true: GPU node selection
  autoscaler   true: the head of an autoscaling cluster (its own service account, whose token is
               projected into the autoscaler sidecar only)
*/}}
{{- define "prolifscore.rayPodTemplate" -}}
{{- $root := .ctx -}}
metadata:
  labels:
    {{- include "prolifscore.labels" (dict "ctx" $root "component" .component) | nindent 4 }}
    prolifscore.io/ray-cluster: {{ .cluster }}
spec:
  serviceAccountName: {{ include "prolifscore.fullname" $root }}{{ if .autoscaler }}-ray-head{{ end }}
  automountServiceAccountToken: false
  securityContext:
    {{- include "prolifscore.podSecurityContext" $root | nindent 4 }}
  {{- if .gpu }}
  {{- include "prolifscore.gpuScheduling" $root | nindent 2 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" .head }}
      image: {{ .image }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- if .driverEnv }}
      envFrom:
        - configMapRef:
            name: {{ include "prolifscore.envConfigMap" $root }}
      env:
        - name: PROLIF_RAY_ADDRESS
          value: auto
        - name: PROLIF_MODEL_ROOT
          value: /data/models
        - name: PROLIF_RUNS_ROOT
          value: /data/runs
        # Where a request's data set (anything under /data: the tiles volume) and start
        # weights file (a volume at /data/weights, or earlier runs' checkpoints) may lie.
        - name: PROLIF_DATA_ROOTS
          value: /data
        - name: PROLIF_WEIGHTS_ROOTS
          value: /data/weights
        - name: PROLIF_TRAIN_WORKERS
          value: {{ .trainWorkers | int64 | quote }}
        {{- include "prolifscore.kafkaClientEnv" (dict "ctx" $root "service" "training") | nindent 8 }}
      {{- end }}
      {{- if .head }}
      ports:
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
        - name: metrics
          containerPort: 8080
      {{- else }}
      ports:
        - name: metrics
          containerPort: 8080
      {{- end }}
      {{- /* Explicit probes: KubeRay's defaults shell out to wget, which the image lacks. */}}
      {{- $path := ternary "/api/gcs_healthz" "/api/local_raylet_healthz" .head }}
      {{- $port := ternary 8265 52365 .head }}
      readinessProbe:
        httpGet:
          path: {{ $path }}
          port: {{ $port }}
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 6
      livenessProbe:
        httpGet:
          path: {{ $path }}
          port: {{ $port }}
        initialDelaySeconds: 30
        periodSeconds: 20
        timeoutSeconds: 5
        failureThreshold: 6
      resources:
        {{- toYaml .resources | nindent 8 }}
      securityContext:
        {{- include "prolifscore.containerSecurityContext" $root | nindent 8 }}
      volumeMounts:
        {{- if eq .volumes "services" }}
        {{- if not .head }}
        - name: slides
          mountPath: /data/slides
          readOnly: true
        - name: tiles
          mountPath: /data/tiles
        # Ray Train checkpoints and TensorBoard logs of the training service's runs.
        - name: runs
          mountPath: /data/runs
        {{- end }}
        {{- else }}
        - name: tiles
          mountPath: /data/tiles
          readOnly: true
        - name: models
          mountPath: /data/models
        - name: runs
          mountPath: /data/runs
        {{- end }}
        {{- if .driverEnv }}
        {{- include "prolifscore.kafkaClientMount" $root | nindent 8 }}
        {{- end }}
        - name: tmp
          mountPath: /tmp
        - name: dshm
          mountPath: /dev/shm
  volumes:
    {{- if eq .volumes "services" }}
    {{- if not .head }}
    - name: slides
      persistentVolumeClaim:
        claimName: {{ include "prolifscore.claimName" (dict "ctx" $root "name" "slides") }}
        readOnly: true
    - name: tiles
      persistentVolumeClaim:
        claimName: {{ include "prolifscore.claimName" (dict "ctx" $root "name" "tiles") }}
    - name: runs
      persistentVolumeClaim:
        claimName: {{ include "prolifscore.claimName" (dict "ctx" $root "name" "runs") }}
    {{- end }}
    {{- else }}
    - name: tiles
      persistentVolumeClaim:
        claimName: {{ include "prolifscore.claimName" (dict "ctx" $root "name" "tiles") }}
        readOnly: true
    - name: models
      persistentVolumeClaim:
        claimName: {{ include "prolifscore.claimName" (dict "ctx" $root "name" "models") }}
    - name: runs
      persistentVolumeClaim:
        claimName: {{ include "prolifscore.claimName" (dict "ctx" $root "name" "runs") }}
    {{- end }}
    {{- if .driverEnv }}
    {{- include "prolifscore.kafkaClientVolume" (dict "ctx" $root "service" "training") | nindent 4 }}
    {{- end }}
    {{- if .autoscaler }}
    # The autoscaler sidecar's Kubernetes API token (mounted in that container only).
    - name: autoscaler-token
      projected:
        sources:
          - serviceAccountToken:
              path: token
              expirationSeconds: 3600
          - configMap:
              name: kube-root-ca.crt
              items: [{key: ca.crt, path: ca.crt}]
          - downwardAPI:
              items:
                - path: namespace
                  fieldRef:
                    fieldPath: metadata.namespace
    {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: 8Gi
    # Ray's object store: shared memory, not the runtime's 64 MiB default /dev/shm.
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ .shmSize }}
{{- end }}
