use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use scalpel_tensor::Tensor;

use crate::{AutogradError, Result};

/// The backward of one recorded op: given the gradient of its output, the gradients of its
/// inputs (`None` where `needs[i]` is false, so frozen inputs cost no work).
pub trait Backward: Send + Sync {
    fn name(&self) -> &'static str;
    fn backward(
        &self,
        inputs: &[Var],
        output: &Tensor,
        grad: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>>;
}

struct Node {
    op: Box<dyn Backward>,
    inputs: Vec<Var>,
}

struct VarInner {
    id: u64,
    value: Tensor,
    requires_grad: bool,
    node: Option<Node>,
}

/// A tensor in the computation, cheap to clone (reference counted).
#[derive(Clone)]
pub struct Var(Arc<VarInner>);

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

impl Var {
    fn new(value: Tensor, requires_grad: bool, node: Option<Node>) -> Var {
        Var(Arc::new(VarInner {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            value,
            requires_grad,
            node,
        }))
    }

    /// A leaf that never receives a gradient (inputs, frozen weights).
    pub fn constant(value: Tensor) -> Var {
        Var::new(value, false, None)
    }

    /// A leaf whose gradient [`Var::backward`] reports (trainable parameters).
    pub fn parameter(value: Tensor) -> Var {
        Var::new(value, true, None)
    }

    /// Records the result of an op. The node is kept only if some input needs a gradient.
    pub fn from_op(value: Tensor, op: impl Backward + 'static, inputs: Vec<Var>) -> Var {
        if inputs.iter().any(Var::requires_grad) {
            Var::new(
                value,
                true,
                Some(Node {
                    op: Box::new(op),
                    inputs,
                }),
            )
        } else {
            Var::constant(value)
        }
    }

    pub fn id(&self) -> u64 {
        self.0.id
    }

    pub fn value(&self) -> &Tensor {
        &self.0.value
    }

    pub fn shape(&self) -> &[usize] {
        self.0.value.shape()
    }

    pub fn requires_grad(&self) -> bool {
        self.0.requires_grad
    }

    /// The value itself, when this is a constant nothing else holds: an op may then overwrite it
    /// instead of allocating its output (inference). Otherwise hands the variable back.
    pub fn into_unshared_constant(self) -> std::result::Result<Tensor, Var> {
        if self.requires_grad() {
            return Err(self);
        }
        Arc::try_unwrap(self.0)
            .map(|inner| inner.value)
            .map_err(Var)
    }

    /// Mutable access to a leaf's value (the optimiser's update). Copies the tensor first if a
    /// live graph still shares it, so a recorded graph never sees its inputs change.
    pub fn value_mut(&mut self) -> Result<&mut Tensor> {
        if self.0.node.is_some() {
            return Err(AutogradError::Graph(
                "only leaf variables can be updated in place".into(),
            ));
        }
        if Arc::get_mut(&mut self.0).is_none() {
            // Keep the identity: gradients and optimiser state are keyed by it.
            let inner = &self.0;
            let copy = VarInner {
                id: inner.id,
                value: inner.value.clone(),
                requires_grad: inner.requires_grad,
                node: None,
            };
            self.0 = Arc::new(copy);
        }
        Ok(&mut Arc::get_mut(&mut self.0).expect("unique after copy").value)
    }

    /// Reverse-mode sweep from this scalar. Returns the gradient of every leaf that requires one
    /// and was reached; intermediate gradients are freed as soon as their node has run.
    pub fn backward(&self) -> Result<Gradients> {
        if self.value().numel() != 1 {
            return Err(AutogradError::Graph(format!(
                "backward needs a scalar loss, got shape {:?}",
                self.shape()
            )));
        }
        let order = self.topological_order();
        let mut grads: HashMap<u64, Tensor> = HashMap::new();
        let seed = Tensor::full(self.shape(), 1.0f64).to_dtype(self.value().dtype());
        grads.insert(self.id(), self.value().device().place(&seed)?);
        let mut leaves = HashMap::new();
        for var in order.iter().rev() {
            let Some(grad) = grads.remove(&var.id()) else {
                continue;
            };
            let Some(node) = &var.0.node else {
                leaves.insert(var.id(), grad);
                continue;
            };
            let needs: Vec<bool> = node.inputs.iter().map(Var::requires_grad).collect();
            let input_grads = node.op.backward(&node.inputs, var.value(), &grad, &needs)?;
            for ((input, g), need) in node.inputs.iter().zip(input_grads).zip(needs) {
                let Some(g) = g else { continue };
                if !need {
                    continue;
                }
                if g.shape() != input.shape() {
                    return Err(AutogradError::Graph(format!(
                        "{} backward produced a gradient of shape {:?} for an input of shape {:?}",
                        node.op.name(),
                        g.shape(),
                        input.shape()
                    )));
                }
                let merged = match grads.remove(&input.id()) {
                    Some(prev) => crate::ops::accumulate(prev, &g)?,
                    None => g,
                };
                grads.insert(input.id(), merged);
            }
        }
        Ok(Gradients(leaves))
    }

    /// Every variable reachable from `self` that requires a gradient, inputs before outputs.
    fn topological_order(&self) -> Vec<Var> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        // Iterative post-order DFS: deep graphs must not overflow the stack.
        let mut stack: Vec<(Var, bool)> = vec![(self.clone(), false)];
        while let Some((var, expanded)) = stack.pop() {
            if expanded {
                order.push(var);
                continue;
            }
            if !var.requires_grad() || !seen.insert(var.id()) {
                continue;
            }
            stack.push((var.clone(), true));
            if let Some(node) = &var.0.node {
                for input in &node.inputs {
                    stack.push((input.clone(), false));
                }
            }
        }
        order
    }
}

/// Gradients of the leaf variables reached by one backward sweep.
pub struct Gradients(HashMap<u64, Tensor>);

impl Gradients {
    pub fn get(&self, var: &Var) -> Option<&Tensor> {
        self.0.get(&var.id())
    }

    pub fn get_mut(&mut self, var: &Var) -> Option<&mut Tensor> {
        self.0.get_mut(&var.id())
    }

    pub fn remove(&mut self, var: &Var) -> Option<Tensor> {
        self.0.remove(&var.id())
    }
}
