# The allow-lists' default: the hosts of some inventory groups, each as one /32 (/128).
# Roles call it from their defaults, e.g.
#   postgresql_client_networks: "{{ postgresql_client_groups | cbk.celery_broker_kit.group_networks(groups, hostvars) }}"
# and whether an address is inside an allow-list, e.g. the run's own SSH client in sshd's.

import ipaddress


def group_networks(group_names, groups, hostvars):
    """One CIDR per host of the named groups (missing groups are skipped).

    A host's address is its gathered default IPv4 address, else its ansible_host, else its
    inventory name; a name that is not an address is returned as is, for the roles'
    validation to name it (e.g. a host whose facts were not gathered in this play).
    """
    networks = []
    for group in group_names:
        for host in groups.get(group, []):
            variables = hostvars[host]
            address = (
                variables.get("ansible_facts", {}).get("default_ipv4", {}).get("address")
                or variables.get("ansible_host")
                or host
            )
            network = f"{address}/{128 if ':' in address else 32}"
            if network not in networks:
                networks.append(network)
    return networks


def address_in_networks(address, networks):
    """True when the address lies in one of the CIDRs (an unparsable entry matches nothing)."""
    ip = ipaddress.ip_address(address)
    for network in networks:
        try:
            if ip in ipaddress.ip_network(network, strict=False):
                return True
        except ValueError:
            continue
    return False


class FilterModule:
    def filters(self):
        return {"group_networks": group_networks, "address_in_networks": address_in_networks}
