"""A read-only networkx view of an fx graph.

The analysis walks this view rather than the fx graph itself, so graph questions (order,
reachability, who feeds whom) are answered by networkx and the fx graph is never touched.
"""

from __future__ import annotations

from typing import Dict, Iterator

import networkx as nx
import torch.fx

__all__ = ["to_networkx", "walk"]


def to_networkx(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """A DiGraph whose nodes are fx node names, with ``fx`` (the node), ``op`` and ``target``
    attributes and an edge for every data dependency.

    >>> import torchvision, fxprune
    >>> g = to_networkx(fxprune.trace(torchvision.models.resnet18()))
    >>> sorted(g.successors("layer1_0_relu_1"))  # block 0's output: block 1's conv and residual add
    ['add_1', 'layer1_1_conv1']
    """
    view = nx.DiGraph()
    for index, node in enumerate(gm.graph.nodes):
        view.add_node(node.name, fx=node, op=node.op, target=node.target, index=index)
        for inp in node.all_input_nodes:
            view.add_edge(inp.name, node.name)
    return view


def walk(view: nx.DiGraph) -> Iterator[torch.fx.Node]:
    """fx nodes in a deterministic topological order (ties broken by fx program order)."""
    index: Dict[str, int] = nx.get_node_attributes(view, "index")
    for name in nx.lexicographical_topological_sort(view, key=index.__getitem__):
        yield view.nodes[name]["fx"]
