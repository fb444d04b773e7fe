// Validates custom resources against the operators' published schemas: the @kubernetes-models
// packages (package.json), generated from KEDA's, cert-manager's and the Prometheus Operator's own
// API types. Reads a JSON array of objects on stdin; writes one JSON entry per object:
// {"schema": "<package>"|null, "errors": [...]} (schema null: no package covers the kind).
import { ScaledObject, TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1";
import { Certificate, Issuer } from "@kubernetes-models/cert-manager/cert-manager.io/v1";
import {
  PodMonitor,
  PrometheusRule,
  ServiceMonitor,
} from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const MODELS = {
  "keda.sh/v1alpha1/ScaledObject": ["@kubernetes-models/keda", ScaledObject],
  "keda.sh/v1alpha1/TriggerAuthentication": ["@kubernetes-models/keda", TriggerAuthentication],
  "cert-manager.io/v1/Certificate": ["@kubernetes-models/cert-manager", Certificate],
  "cert-manager.io/v1/Issuer": ["@kubernetes-models/cert-manager", Issuer],
  "monitoring.coreos.com/v1/ServiceMonitor": ["@kubernetes-models/prometheus-operator", ServiceMonitor],
  "monitoring.coreos.com/v1/PodMonitor": ["@kubernetes-models/prometheus-operator", PodMonitor],
  "monitoring.coreos.com/v1/PrometheusRule": ["@kubernetes-models/prometheus-operator", PrometheusRule],
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
const results = JSON.parse(input).map((obj) => {
  const found = MODELS[`${obj.apiVersion}/${obj.kind}`];
  if (!found) return { schema: null, errors: [] };
  const [pkg, Model] = found;
  try {
    new Model(obj).validate();
    return { schema: pkg, errors: [] };
  } catch (err) {
    const detail = (err.errors || []).map((e) => `${e.instancePath} ${e.message}`);
    return { schema: pkg, errors: detail.length ? detail : [String(err.message)] };
  }
});
process.stdout.write(JSON.stringify(results));
