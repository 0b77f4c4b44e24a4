"""Flux -> Gitea: the shell around the pure status decisions (`receiver.status.decisions`).

One job per module: `locator` (which objects, repositories and instances a status concerns),
`secrets` (configured secrets, cached), `versions` (what each Gitea instance accepts),
`gitea_view` (what Gitea shows, read and remembered for the repeat window), `queue` (jobs,
workers, retries), `fleet_checks` (the aggregate status), `resync` (repairs from live state,
one Lease holder), `signals` (pushes and delivery outcomes), `events_endpoint` and
`badge_endpoint` (HTTP), and `service`, which wires them and owns their lifecycle.
"""
