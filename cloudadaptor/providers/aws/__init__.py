"""The AWS provider: pod VMs on EC2 through boto3.

Modules, each with one job:

- ``config``: the peer-pods-cm / peer-pods-secret keys and the typed ``AwsConfig``;
- ``imds``: the worker's instance metadata (IMDSv2) to fill region, subnet, VPC and SGs;
- ``client``: the one EC2 client (botocore retries) and error classification;
- ``slimmodel``: the operations the daemon calls, and the slim botocore data made from them;
- ``catalog``: AMI and instance-type facts (DescribeImages, DescribeInstanceTypes);
- ``checks``: the start-up checks (``verify``);
- ``instances``: RunInstances request, adoption by client token, waits, terminate, list;
- ``network``: security-group rules the peer pods need (``aws open-ports``);
- ``provider``: ``AwsProvider``, the ``Provider`` protocol over the above;
- ``commands``: the ``cloud-api-adaptor aws ...`` subcommands.

Importing this package imports no SDK; ``provider`` and ``commands`` do.
"""
