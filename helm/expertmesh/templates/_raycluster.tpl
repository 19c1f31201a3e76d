{{/*
The Ray cluster of the RayService: head and worker groups, image, resources, autoscaler on.
rayservice.yaml puts it in the RayService; the operator gets the same (its --ray-cluster-config)
for the case where it must create the RayService itself.
*/}}
{{- define "expertmesh.rayClusterConfig" -}}
{{- $rs := .Values.rayService }}
{{- $image := include "expertmesh.image" (dict "image" $rs.image "chart" .Chart) -}}
rayVersion: {{ $rs.rayVersion | quote }}
enableInTreeAutoscaling: true
autoscalerOptions:
  upscalingMode: {{ $rs.autoscaler.upscalingMode }}
  idleTimeoutSeconds: {{ $rs.autoscaler.idleTimeoutSeconds }}
headGroupSpec:
  serviceType: {{ $rs.head.serviceType }}
  rayStartParams:
    {{- toYaml (merge (deepCopy $rs.head.rayStartParams) (dict "dashboard-host" "0.0.0.0" "metrics-export-port" "8080")) | nindent 4 }}
  template:
    metadata:
      {{- include "expertmesh.rayPodMetadata" . | nindent 6 }}
    spec:
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-head
          image: {{ $image | quote }}
          imagePullPolicy: {{ $rs.image.pullPolicy }}
          ports:
            - name: gcs-server
              containerPort: 6379
            - name: dashboard
              containerPort: 8265
            - name: client
              containerPort: 10001
            {{- include "expertmesh.rayPorts" . | nindent 12 }}
          {{- with $rs.env }}
          env:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $rs.head.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $rs.modelVolumeClaims }}
          volumeMounts:
            {{- include "expertmesh.modelVolumeMounts" $ | nindent 12 }}
          {{- end }}
      {{- with $rs.modelVolumeClaims }}
      volumes:
        {{- include "expertmesh.modelVolumes" $ | nindent 8 }}
      {{- end }}
      {{- with $rs.head.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $rs.head.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $rs.head.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
workerGroupSpecs:
  {{- range $rs.workerGroups }}
  - groupName: {{ .name }}
    replicas: {{ hasKey . "replicas" | ternary .replicas .minReplicas }}
    minReplicas: {{ .minReplicas }}
    maxReplicas: {{ .maxReplicas }}
    rayStartParams:
      {{- toYaml (merge (deepCopy (default dict .rayStartParams)) (dict "metrics-export-port" "8080")) | nindent 6 }}
    template:
      metadata:
        {{- include "expertmesh.rayPodMetadata" $ | nindent 8 }}
      spec:
        {{- with $.Values.imagePullSecrets }}
        imagePullSecrets:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        containers:
          - name: ray-worker
            image: {{ $image | quote }}
            imagePullPolicy: {{ $rs.image.pullPolicy }}
            ports:
              {{- include "expertmesh.rayPorts" $ | nindent 14 }}
            {{- with $rs.env }}
            env:
              {{- toYaml . | nindent 14 }}
            {{- end }}
            {{- with .resources }}
            resources:
              {{- toYaml . | nindent 14 }}
            {{- end }}
            {{- with $rs.modelVolumeClaims }}
            volumeMounts:
              {{- include "expertmesh.modelVolumeMounts" $ | nindent 14 }}
            {{- end }}
        {{- with $rs.modelVolumeClaims }}
        volumes:
          {{- include "expertmesh.modelVolumes" $ | nindent 10 }}
        {{- end }}
        {{- with .nodeSelector }}
        nodeSelector:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with .tolerations }}
        tolerations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with .affinity }}
        affinity:
          {{- toYaml . | nindent 10 }}
        {{- end }}
  {{- end }}
{{- end -}}
