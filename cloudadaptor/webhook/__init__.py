"""The peer-pod mutating admission webhook (`cloud-api-adaptor webhook`).

``mutate`` turns a pod's CPU/memory into VM-size annotations and a
``kata.peerpods.io/vm`` request (pure functions over JSON); ``quantity``
parses Kubernetes quantities; ``server`` serves AdmissionReview v1 over HTTPS.
"""
