"""The --help epilogs: what each command means and examples to copy (kept out of the parser code)."""

MAIN_EPILOG = """\
examples:
  lightpath status -A                        # where every Service stands
  lightpath plan -n shop                     # what migrating namespace shop would change
  lightpath migrate shop/web shop/api        # opt two Services in, verify the handoff
  lightpath migrate -n shop --namespace-label --batch 20 --pause 5
  lightpath rollback -A                      # everything back to kube-proxy
  lightpath reconcile -A --dry-run           # Services the webhook missed
  kubectl lightpath status -n shop -o json   # the same, as a kubectl plugin
"""

STATUS_EPILOG = """\
HANDLED-BY is who serves the Service now (from its service.kubernetes.io/service-proxy-name label);
WANTS is who the policy says should; PENDING marks a disagreement, e.g. a Service admitted while the
webhook was down (fix with `lightpath reconcile`).

examples:
  lightpath status                       # the context's namespace
  lightpath status -n shop
  lightpath status -A -o json | jq '.items[] | select(.pending)'
  lightpath status -A --mode opt-out     # judge with the policy config the webhook runs with
"""

PLAN_EPILOG = """\
ACTION is label (write lightpath.cloud/proxy), touch (the label is already right but the webhook has not
acted: re-run it with an annotation write), unchanged or skip (with the policy's reason: UDP/SCTP port,
headless, excluded namespace, another proxy's Service, ...).

examples:
  lightpath plan shop/web shop/dns
  lightpath plan -n shop --namespace-label
  lightpath plan -A --rollback -o yaml
"""

MIGRATE_EPILOG = """\
Each write is a JSON merge patch of the one label; the webhook adds the handoff label on that UPDATE.
After every batch the Services are read back; the first one that did not move stops the run (unless
--continue-on-error) and the report lists exactly which Services were changed. Re-running is safe:
Services already migrated are left alone.

examples:
  lightpath migrate web api -n shop          # two Services
  lightpath migrate -n shop --batch 5 --pause 10
  lightpath migrate shop --namespace-label   # label Namespace shop, then move its Services
  lightpath migrate -A --dry-run
"""

ROLLBACK_EPILOG = """\
Sets lightpath.cloud/proxy=disabled (on the Service wins over its Namespace) and verifies that
service.kubernetes.io/service-proxy-name is gone. Services already on kube-proxy and not wanted by the
policy are left alone. If the webhook is down, rollback stops and names the Service; run
`lightpath reconcile` afterwards, which removes the label directly when the webhook does not act.

examples:
  lightpath rollback shop/web
  lightpath rollback -A                      # everything back to kube-proxy
  lightpath rollback shop --namespace-label  # Namespace shop back to kube-proxy
"""

RECONCILE_EPILOG = """\
For every PENDING Service, reconcile first touches the annotation lightpath.cloud/reconciled-at, an
UPDATE that makes the webhook decide again; if the Service still disagrees with the policy it writes
the handoff label itself and says so ("direct"). See docs/migration.md.

examples:
  lightpath reconcile -A --dry-run
  lightpath reconcile -n shop
"""

UNINSTALL_EPILOG = """\
Before `kubectl delete -k deploy/default`: deletes lightpath's MutatingWebhookConfiguration (no Service is
handed over any more), removes the handoff label from every Service that carries it, then waits until
every live node agent reports 0 redirects in its Lease (each keeps a handed-back Service's redirect until
kube-proxy's rule is visible on its node). Exit 0: safe to delete the components; the agents remove
their rules as their DaemonSet goes. Exit 1: the nodes still holding redirects are named; nothing else
changed. See docs/install.md.

examples:
  lightpath uninstall && kubectl delete -k deploy/default
  lightpath uninstall --timeout 300
"""
