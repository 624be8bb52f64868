"""The pod network: netns inspection and the VXLAN tunnel, worker side and VM side.

- ``api``: the ``PodNetwork`` seam the lifecycle uses (no pyroute2), errors, device names;
- ``netns``: reading the pod netns CNI made, and the worker address pod VMs reach;
- ``tunnel``: the worker side (VXLAN device moved into the pod netns, tc redirects);
- ``vxlan``: ``VxlanPodNetwork``, the asyncio ``PodNetwork`` over the two above;
- ``vmside``: the pod VM side (``python -m cloudadaptor.podnetwork.vmside``).

All network configuration goes through pyroute2, whose synchronous API runs
its own event loop (and the worker side's steps run its ``AsyncIPRoute`` on a
loop of their own, ``netnsocket.run_async``): the blocking functions here are
called from asyncio code through ``asyncio.to_thread`` only.
"""
