"""Pod VM images: ``cloud-api-adaptor image build|list|delete aws|azure``.

``build`` boots a temporary builder VM from a base image (RHEL 9 by
default), uploads the pod VM files (``images/podvm``), our wheel and the
operator's kata-agent payload over SFTP, runs ``provision.py install`` and
``seal`` over SSH (paramiko), and captures the VM as ``peer-pod-ami`` (AWS)
or ``peer-pod-vmimage`` (Azure). Modules: ``build`` (the step order, the
clean-up guarantee), ``aws`` / ``azure`` (one cloud each), ``inputs``,
``wheel``, ``ssh``, ``remote``, ``progress``, ``cleanup``, ``configmap``,
``command`` (the CLI).
"""
