"""Wire constants shared by the worker and the pod VM: one home for each number and name.

Anything both sides of a connection must agree on lives here, so a change is
made once: the agent port the forwarder listens on and the proxy dials, the
VXLAN defaults, the pod's network namespace inside the VM, the files user
data may write, the TLS versions both ends accept, the clouds' user-data
limits. See docs/ARCHITECTURE.md ("Wire facts").
"""

from __future__ import annotations

import ssl
from typing import Final, Mapping

# The agent-protocol-forwarder in the pod VM listens here (TCP, mTLS); the agent proxy dials it.
AGENT_PORT: Final = 15150

# VXLAN between the worker and the pod VM: UDP, one VNI per live sandbox from VXLAN_MIN_ID up.
VXLAN_PORT: Final = 9000
VXLAN_MIN_ID: Final = 555000
MAX_VNI: Final = 2**24 - 1
# VXLAN adds 50 bytes to an Ethernet frame; pod interfaces are clamped so a 1500-byte underlay carries them.
VXLAN_MAX_MTU: Final = 1450

# The pod's network namespace inside the VM, where the VXLAN device becomes the pod's eth0.
PODNS: Final = "podns"
PODNS_PATH: Final = f"/run/netns/{PODNS}"

# TLS versions accepted by TLS_MIN_VERSION, and what each means to the ssl module.
TLS_VERSIONS: Final[Mapping[str, ssl.TLSVersion]] = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
DEFAULT_TLS_MIN_VERSION: Final = "1.2"

# Clouds' limits on user data (bytes, as sent to the API).
AWS_USER_DATA_LIMIT: Final = 16384
AZURE_USER_DATA_LIMIT: Final = 65536

# Warm pool: a pool VM's claim step listens on AGENT_PORT (mTLS) before its forwarder does, and takes
# exactly one ttrpc call CLAIM_SERVICE/CLAIM_METHOD whose payload is the pod's user data (#cloud-config).
CLAIM_SERVICE: Final = "peerpod.PodVMClaim"
CLAIM_METHOD: Final = "Claim"

# Certificate renewal: the pod's forwarder answers these itself (they never reach the kata-agent) on AGENT_PORT,
# so only a client holding the adaptor's certificate gets to them. Both answer JSON {"serial", "not_after"} of the
# certificate served from then on; RENEW's payload is JSON {"cert_pem", "key_pem", "client_ca_pem"} (apf.json's
# "tls"). A forwarder without them relays the call to the agent, which answers UNIMPLEMENTED.
CERT_SERVICE: Final = "peerpod.PodVMCertificate"
CERT_CURRENT_METHOD: Final = "Current"
CERT_RENEW_METHOD: Final = "Renew"
