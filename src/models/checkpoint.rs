//! A backward pass one segment at a time, and gradient checkpointing. candle keeps every tensor
//! on the graph until the backward pass ends, and every weight's gradient with them; for a
//! training step of the full-size UNet at 512 px that is several GiB.
//!
//! A model writes its forward once, generic over [`Segments`]: [`Direct`] runs it as a plain
//! forward; a [`Tape`] records it as a chain of segments, each a graph of its own whose inputs
//! are leaves. [`Tape::backward`] then backpropagates through one segment at a time, in reverse:
//! the vector-Jacobian product of a segment's outputs `y` with their gradients `g`, candle's
//! backward started from `g` (`Tensor::backward_with`, vendor/README.md), or for several outputs
//! the gradient of the scalar `sum(y g)`. The weights' gradients reach a callback per segment, where
//! an optimizer can step them, so not all of them exist at once; each weight must belong to one
//! segment (a shared weight would be stepped once per segment, and under the graph of another).
//!
//! [`Tape::keeping`] keeps each segment's graph from the forward and drops it once its backward
//! has run, so the activations are freed as the backward goes, and no gradient lives past its
//! segment: the plain backward's arithmetic, with a model's size of gradients less at the
//! peak. [`Tape::checkpointed`] runs the forward on a copy of the model whose weights are
//! detached (no graph: only the segments' inputs and outputs stay) and each segment again in the
//! backward: at most one segment's activations exist at a time, for the price of one more
//! forward pass.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// A forward pass of segments, each `f(model, inputs) -> outputs`.
pub trait Segments<M> {
    /// What the pass handles between segments: tensors, or a [`Tape`]'s handles to them.
    type Value: Clone;

    /// Runs one segment. Each weight `f` reads must be read by no other segment.
    fn run(&mut self, inputs: &[Self::Value], f: impl Fn(&M, &[Tensor]) -> Result<Vec<Tensor>> + 'static) -> Result<Vec<Self::Value>>;

    /// The dimensions of a value.
    fn dims(&self, value: &Self::Value) -> Vec<usize>;

    /// [`Segments::run`] for a segment of one output.
    fn run1(&mut self, inputs: &[Self::Value], f: impl Fn(&M, &[Tensor]) -> Result<Tensor> + 'static) -> Result<Self::Value> {
        let mut outputs = self.run(inputs, move |m, x| Ok(vec![f(m, x)?]))?;
        Ok(outputs.remove(0))
    }
}

/// The plain forward: each segment on the model as it is.
pub struct Direct<'m, M>(pub &'m M);

impl<M> Segments<M> for Direct<'_, M> {
    type Value = Tensor;

    fn run(&mut self, inputs: &[Tensor], f: impl Fn(&M, &[Tensor]) -> Result<Vec<Tensor>> + 'static) -> Result<Vec<Tensor>> {
        f(self.0, inputs)
    }

    fn dims(&self, value: &Tensor) -> Vec<usize> {
        value.dims().to_vec()
    }
}

/// A value of a [`Tape`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Value(usize);

type SegmentFn<M> = Box<dyn Fn(&M, &[Tensor]) -> Result<Vec<Tensor>>>;

/// Where a segment's graph comes from in the backward.
enum Graph<M> {
    /// Kept from the forward: the leaves its inputs became (`None`: no gradient wanted), its
    /// outputs.
    Kept(Vec<Option<Var>>, Vec<Tensor>),
    /// Run again on the trainable model.
    Recomputed(SegmentFn<M>),
}

struct Segment<M> {
    inputs: Vec<Value>,
    outputs: Vec<Value>,
    graph: Graph<M>,
}

/// A forward pass recorded as segments, to be backpropagated one segment at a time.
pub struct Tape<'m, M> {
    /// The model the forward runs on: the trainable one, or (checkpointed) its weights detached.
    model: &'m M,
    /// Checkpointed: the trainable model, on which the backward runs each segment again.
    recompute_on: Option<&'m M>,
    values: Vec<Tensor>,
    /// Per value: whether its gradient is wanted (segment outputs, and the inputs that ask).
    wants_grad: Vec<bool>,
    /// The inputs whose gradients [`Tape::backward`] returns.
    asked: Vec<Value>,
    segments: Vec<Segment<M>>,
}

impl<'m, M> Tape<'m, M> {
    /// Segments' graphs kept from the forward, run on `trainable`.
    pub fn keeping(trainable: &'m M) -> Self {
        Self::on(trainable, None)
    }

    /// Gradient checkpointing: the forward on `frozen`, the model with its weights detached
    /// (sharing storage with `trainable`), each segment run again on `trainable` in the backward.
    pub fn checkpointed(frozen: &'m M, trainable: &'m M) -> Self {
        Self::on(frozen, Some(trainable))
    }

    fn on(model: &'m M, recompute_on: Option<&'m M>) -> Self {
        Self { model, recompute_on, values: Vec::new(), wants_grad: Vec::new(), asked: Vec::new(), segments: Vec::new() }
    }

    /// An input of the pass; `grad`: whether [`Tape::backward`] returns its gradient.
    pub fn input(&mut self, t: &Tensor, grad: bool) -> Value {
        let v = self.push(t.detach(), grad);
        if grad {
            self.asked.push(v);
        }
        v
    }

    fn push(&mut self, t: Tensor, grad: bool) -> Value {
        self.values.push(t);
        self.wants_grad.push(grad);
        Value(self.values.len() - 1)
    }

    /// A value as the forward computed it (detached).
    pub fn value(&self, v: Value) -> &Tensor {
        &self.values[v.0]
    }

    /// A segment's inputs as its graph takes them: those whose gradients are wanted as leaves
    /// (`Var::from_tensor` copies them), with the leaves.
    fn leaves(&self, inputs: &[Value]) -> Result<(Vec<Option<Var>>, Vec<Tensor>)> {
        let vars: Vec<Option<Var>> = inputs
            .iter()
            .map(|i| if self.wants_grad[i.0] { Var::from_tensor(&self.values[i.0]).map(Some) } else { Ok(None) })
            .collect::<Result<_>>()?;
        let xs = inputs
            .iter()
            .zip(&vars)
            .map(|(i, var)| var.as_ref().map_or_else(|| self.values[i.0].clone(), |v| v.as_tensor().clone()))
            .collect();
        Ok((vars, xs))
    }

    /// Backpropagates `grads` (of values, summed where one appears twice) through the segments in
    /// reverse; `on_weights` gets each segment's gradients (of its weights that are variables)
    /// before the next segment's backward. Returns the gradients of the inputs that asked for one,
    /// in the order asked (`None` where the output does not depend on that input).
    pub fn backward<E: From<candle_core::Error>>(
        mut self,
        grads: Vec<(Value, Tensor)>,
        mut on_weights: impl FnMut(&GradStore) -> std::result::Result<(), E>,
    ) -> std::result::Result<Vec<(Value, Option<Tensor>)>, E> {
        let mut acc: Vec<Option<Tensor>> = vec![None; self.values.len()];
        for (v, g) in grads {
            add_grad(&mut acc[v.0], g.detach())?;
        }
        for segment in std::mem::take(&mut self.segments).into_iter().rev() {
            let outs: Vec<(usize, Tensor)> =
                segment.outputs.iter().enumerate().filter_map(|(j, o)| acc[o.0].take().map(|g| (j, g))).collect();
            if outs.is_empty() {
                continue;
            }
            let (vars, ys) = match segment.graph {
                Graph::Kept(vars, ys) => (vars, ys),
                Graph::Recomputed(f) => {
                    let trainable = self.recompute_on.ok_or_else(|| candle_core::Error::Msg("no model to recompute on".into()))?;
                    let (vars, inputs) = self.leaves(&segment.inputs)?;
                    let ys = f(trainable, &inputs)?;
                    if ys.len() != segment.outputs.len() {
                        let msg =
                            format!("a segment gave {} outputs in the backward, {} in the forward", ys.len(), segment.outputs.len());
                        return Err(candle_core::Error::Msg(msg).into());
                    }
                    (vars, ys)
                }
            };
            // One output's backward starts from its gradient; several are summed as `sum(y g)`.
            let store = match &outs[..] {
                [(j, g)] => ys[*j].backward_with(&g.to_dtype(ys[*j].dtype())?)?,
                _ => {
                    let terms: Vec<Tensor> =
                        outs.iter().map(|(j, g)| (&ys[*j] * g.to_dtype(ys[*j].dtype())?)?.sum_all()).collect::<Result<_>>()?;
                    Tensor::stack(&terms, 0)?.sum_all()?.backward()?
                }
            };
            for (i, var) in segment.inputs.iter().zip(&vars) {
                if let Some(g) = var.as_ref().and_then(|v| store.get(v.as_tensor())) {
                    // Detached: candle's gradients can record how they were computed (from the
                    // segment's weights), which the next segment's backward would follow.
                    add_grad(&mut acc[i.0], g.detach())?;
                }
            }
            on_weights(&store)?;
            // Here the segment's graph goes, and with it (kept) its activations.
        }
        Ok(self.asked.iter().map(|v| (*v, acc[v.0].take())).collect())
    }
}

fn add_grad(slot: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    *slot = Some(match slot.take() {
        Some(s) => (s + g)?,
        None => g,
    });
    Ok(())
}

impl<M> Segments<M> for Tape<'_, M> {
    type Value = Value;

    fn run(&mut self, inputs: &[Value], f: impl Fn(&M, &[Tensor]) -> Result<Vec<Tensor>> + 'static) -> Result<Vec<Value>> {
        let (graph, ys) = if self.recompute_on.is_some() {
            let xs: Vec<Tensor> = inputs.iter().map(|v| self.values[v.0].clone()).collect();
            let ys = f(self.model, &xs)?;
            (Graph::Recomputed(Box::new(f)), ys)
        } else {
            let (vars, xs) = self.leaves(inputs)?;
            let ys = f(self.model, &xs)?;
            (Graph::Kept(vars, ys.clone()), ys)
        };
        let outputs: Vec<Value> = ys.into_iter().map(|y| self.push(y.detach(), true)).collect();
        self.segments.push(Segment { inputs: inputs.to_vec(), outputs: outputs.clone(), graph });
        Ok(outputs)
    }

    fn dims(&self, value: &Value) -> Vec<usize> {
        self.values[value.0].dims().to_vec()
    }
}
