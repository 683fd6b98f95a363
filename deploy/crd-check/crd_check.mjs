// Validates custom resources against the OpenAPI schemas of their CRDs, as
// compiled into the @kubernetes-models packages (pinned in package.json /
// package-lock.json): @kubernetes-models/prometheus-operator is generated
// from the Prometheus Operator's CRDs (v0.90.1 per its changelog for 5.0.0),
// @kubernetes-models/cert-manager from cert-manager's.
//   node crd_check.mjs RESOURCES.json   (a JSON list of the documents)
// Exits 1 naming each invalid object and what is wrong; 2 on a kind it has
// no schema for (so a new kind cannot slip through unchecked).
import { readFileSync } from "node:fs";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { Certificate } from "@kubernetes-models/cert-manager/cert-manager.io/v1/Certificate";
import { Issuer } from "@kubernetes-models/cert-manager/cert-manager.io/v1/Issuer";

const models = { PodMonitor, PrometheusRule, Certificate, Issuer };
const docs = JSON.parse(readFileSync(process.argv[2], "utf8"));
let failed = 0;
for (const { file, doc } of docs) {
  const name = `${file}: ${doc.kind}/${doc.metadata?.name}`;
  const Model = models[doc.kind];
  if (!Model || doc.apiVersion !== Model.apiVersion) {
    console.error(`crd_check: ${name}: no schema for ${doc.apiVersion} ${doc.kind}`);
    process.exit(2);
  }
  try {
    new Model(doc).validate();
  } catch (e) {
    failed++;
    console.error(`crd_check: ${name}: ${e.message}`);
  }
}
if (failed) process.exit(1);
console.log(`OK: ${docs.length} custom resources valid against their CRD schemas`);
