{{/* Chart name. */}}
{{- define "winback.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, unless the release name already contains the chart name. */}}
{{- define "winback.fullname" -}}
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

{{/* The name of one service's objects: <fullname>-<service>. Call with (list $ "ingest"). */}}
{{- define "winback.componentName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "winback.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "winback.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "winback.labels" -}}
helm.sh/chart: {{ include "winback.chart" . }}
{{ include "winback.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: winback
{{- end }}

{{/* Labels that select the release's pods and Services. */}}
{{- define "winback.selectorLabels" -}}
app.kubernetes.io/name: {{ include "winback.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one service's objects. Call with (list $ "ingest"). */}}
{{- define "winback.componentLabels" -}}
{{ include "winback.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Selector labels of one service's pods. Call with (list $ "ingest"). */}}
{{- define "winback.componentSelectorLabels" -}}
{{ include "winback.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "winback.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "winback.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "winback.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
The settings every container gets besides the secrets: .Values.config, the listen address, each
service's port, and whether the services run the outbox relay in process. A map of name → value.
*/}}
{{- define "winback.settings" -}}
{{- $settings := dict "WINBACK_HTTP__HOST" "0.0.0.0" }}
{{- $_ := set $settings "WINBACK_OUTBOX__RELAY_ENABLED" (ternary "false" "true" .Values.services.relay.enabled) }}
{{- range $name, $service := .Values.services }}
{{- $_ := set $settings (printf "WINBACK_HTTP__%s_PORT" (upper $name)) (toString $service.port) }}
{{- end }}
{{- range $key, $value := .Values.config }}
{{- if not (regexMatch "^WINBACK_[A-Z0-9_]+$" $key) }}
{{- fail (printf "config.%s: settings are environment variables named WINBACK_..." $key) }}
{{- end }}
{{- $_ := set $settings $key (toString $value) }}
{{- end }}
{{- toYaml $settings }}
{{- end }}

{{/* Secret references (env entries). */}}
{{- define "winback.secretEnv" -}}
{{- $secret := required "secrets.existingSecret: name the Secret holding the database URL and keys" .Values.secrets.existingSecret }}
{{- range $name, $ref := .Values.secrets.env }}
{{- if not (regexMatch "^WINBACK_[A-Z0-9_]+$" $name) }}
{{- fail (printf "secrets.env.%s: settings are environment variables named WINBACK_..." $name) }}
{{- end }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.name | default $secret }}
      key: {{ required (printf "secrets.env.%s.key" $name) $ref.key }}
      {{- if $ref.optional }}
      optional: true
      {{- end }}
{{- end }}
{{- end }}

{{/* Volumes for a read-only root filesystem: /tmp and the working directory. */}}
{{- define "winback.volumes" -}}
- name: tmp
  emptyDir:
    medium: Memory
    sizeLimit: 64Mi
- name: work
  emptyDir:
    sizeLimit: 1Gi
{{- end }}

{{- define "winback.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: work
  mountPath: /var/lib/winback
{{- end }}

{{/*
The public routes: the only paths the Ingress or HTTPRoute exposes, each to the service that
serves it (and only when that service is enabled). A YAML list of {service, path, port}.
*/}}
{{- define "winback.publicRoutes" -}}
{{- $routes := list }}
{{- $public := list (list "dispatcher" "/u/") (list "dispatcher" "/v1/webhooks/") (list "ingest" "/v1/billing/") }}
{{- range $public }}
{{- $service := index $.Values.services (index . 0) }}
{{- if $service.enabled }}
{{- $routes = append $routes (dict "service" (include "winback.componentName" (list $ (index . 0))) "path" (index . 1) "port" $service.port) }}
{{- end }}
{{- end }}
{{- toYaml $routes }}
{{- end }}
