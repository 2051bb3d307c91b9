// Evaluates AWS requests against IAM policies with @cloud-copilot/iam-simulate (a maintained IAM policy simulator).
//   node tests/iam/evaluate.mjs < requests.json > decisions.json
// Input: a JSON list of {principal, action, resource, accountId, context, identityPolicies: [{name, policy}],
// resourcePolicy?}. Output: one {result, allowedBy, errors} per request, in order; result is Allowed,
// ImplicitlyDenied, ExplicitlyDenied or Error (the simulator refused the request: an unknown action, an ARN that
// does not fit the action, a context key the action does not have).
import { runSimulation } from '@cloud-copilot/iam-simulate'
import { readFileSync } from 'node:fs'

const requests = JSON.parse(readFileSync(0, 'utf8'))
const out = []
for (const r of requests) {
  const simulation = {
    request: {
      principal: r.principal,
      action: r.action,
      resource: { resource: r.resource, accountId: r.accountId },
      contextVariables: r.context || {}
    },
    identityPolicies: r.identityPolicies,
    serviceControlPolicies: [],
    resourceControlPolicies: [],
    resourcePolicy: r.resourcePolicy
  }
  const response = await runSimulation(simulation, {})
  if (response.resultType === 'error') {
    out.push({ result: 'Error', allowedBy: [], errors: response.errors })
    continue
  }
  // `single`: one answer; `wildcard` (an action with no resource type, e.g. cloudwatch:PutMetricData): one per
  // matching resource pattern, and overallResult over them.
  const analyses = response.resultType === 'single' ? [response.result?.analysis] : (response.results || []).map((x) => x.analysis)
  if (analyses.length === 0 || analyses.some((a) => !a)) {
    out.push({ result: 'Error', allowedBy: [], errors: [response.resultType, response.overallResult] })
    continue
  }
  const allowedBy = analyses.flatMap((a) => (a.identityAnalysis?.allowStatements || []).map(
    (s) => `${s.policyId}:${s.explain?.identifier ?? "?"}`
  ))
  out.push({ result: response.overallResult, allowedBy, errors: null })
}
process.stdout.write(JSON.stringify(out))
