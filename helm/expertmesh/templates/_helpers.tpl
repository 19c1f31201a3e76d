{{/* Chart name, truncated to fit Kubernetes names. */}}
{{- define "expertmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Release full name: the release name when it already contains the chart name ("expertmesh"). */}}
{{- define "expertmesh.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "expertmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "expertmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "expertmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "expertmesh.labels" -}}
helm.sh/chart: {{ include "expertmesh.chart" . }}
{{ include "expertmesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: expertmesh
{{- end -}}

{{- define "expertmesh.operatorName" -}}
{{- printf "%s-operator" (include "expertmesh.fullname" .) -}}
{{- end -}}

{{- define "expertmesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "expertmesh.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The RayService the operator writes Models into (the operator's --rayservice). */}}
{{- define "expertmesh.rayServiceName" -}}
{{- default (include "expertmesh.fullname" .) .Values.rayService.name -}}
{{- end -}}

{{- define "expertmesh.image" -}}
{{- printf "%s:%s" .image.repository (default .chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* Namespaces whose Models the operator reconciles; empty when cluster-wide. */}}
{{- define "expertmesh.watchNamespaces" -}}
{{- if .Values.operator.clusterWide -}}
{{- if .Values.operator.watchNamespaces -}}
{{- fail "operator.watchNamespaces must be empty when operator.clusterWide is true (it watches every namespace)" -}}
{{- end -}}
{{- else -}}
{{- toJson (default (list .Release.Namespace) .Values.operator.watchNamespaces) -}}
{{- end -}}
{{- end -}}

{{/*
The platform as the chart starts it: the Router alone, no models. It is exactly
expertmesh.serve.app.serve_deploy_config(ServeConfig(models=[])) (tests/unit/helm checks
that), so the operator, which owns serveConfigV2 from then on, starts from the same config.
*/}}
{{- define "expertmesh.initialServeConfig" -}}
applications:
- args: {}
  deployments:
  - name: Router
    user_config:
      config:
        api_key: null
        grpc_port: 9000
        http_port: 8000
        models: []
      traffic: {}
  import_path: expertmesh.serve.app:router_builder
  name: expertmesh
  route_prefix: /
grpc_options:
  enable_reflection: true
  grpc_servicer_functions:
  - expertmesh.api.pb.grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server
  - expertmesh.api.pb.generation_pb2_grpc.add_GenerationServicer_to_server
  - grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server
  port: 9000
  request_timeout_s: null
{{- end -}}


{{/* RBAC rules for Models in one namespace (or all of them). */}}
{{- define "expertmesh.modelRules" -}}
- apiGroups: ["serving.expertmesh.io"]
  resources: ["models"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["serving.expertmesh.io"]
  resources: ["models/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}


{{/* Ray pods: ports, model volumes, metadata (rayservice.yaml). */}}
{{- define "expertmesh.rayPorts" -}}
- name: serve
  containerPort: 8000
- name: serve-grpc
  containerPort: 9000
- name: metrics
  containerPort: 8080
{{- end -}}

{{- define "expertmesh.modelVolumeMounts" -}}
{{- $mounts := list }}
{{- range $i, $claim := .Values.rayService.modelVolumeClaims }}
{{- $mounts = append $mounts (dict "name" (printf "model-volume-%d" $i) "mountPath" (printf "/mnt/models/%s" $claim) "readOnly" true) }}
{{- end }}
{{- toYaml $mounts }}
{{- end -}}

{{- define "expertmesh.modelVolumes" -}}
{{- $volumes := list }}
{{- range $i, $claim := .Values.rayService.modelVolumeClaims }}
{{- $volumes = append $volumes (dict "name" (printf "model-volume-%d" $i) "persistentVolumeClaim" (dict "claimName" $claim "readOnly" true)) }}
{{- end }}
{{- toYaml $volumes }}
{{- end -}}

{{- define "expertmesh.rayPodMetadata" -}}
labels:
  {{- include "expertmesh.selectorLabels" . | nindent 2 }}
  app.kubernetes.io/component: ray
  {{- with .Values.rayService.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .Values.rayService.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
