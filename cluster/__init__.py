"""Where Ray runs: joining or starting a local Ray cluster bound to loopback (`local`), a Ray head
of our own and Serve's control plane over the dashboard's REST API (`serve`), and KubeRay on
Kubernetes (`kube`). It knows nothing of domains, training or serving code.
"""
