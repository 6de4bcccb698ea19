{{/* Common names and labels. */}}
{{- define "tandem.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tandem.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: tandem
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "tandem.operator.selector" -}}
app.kubernetes.io/name: tandem-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tandem.csi.selector" -}}
app.kubernetes.io/name: tandem-csi-node
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* An image reference: (dict "repo" <repository> "root" $). */}}
{{- define "tandem.image" -}}
{{- $tag := .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- printf "%s%s:%s" .root.Values.image.registry .repo $tag -}}
{{- end -}}

{{- define "tandem.csiController.selector" -}}
app.kubernetes.io/name: tandem-csi-controller
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
